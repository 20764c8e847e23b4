//! The palisade quick start: every crate on its embedded default, no server needed.
//!
//! Run it with `cargo run --example quickstart`.

mod breaker;
mod idempotency;
mod lock;
mod ratelimit;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("palisade quick start (embedded defaults, no servers)\n");
    breaker::demo().await?;
    ratelimit::demo().await?;
    lock::demo().await?;
    idempotency::demo().await?;
    println!("\nall done");
    Ok(())
}
