//! The idempotency part of the quick start.

/// Shows palisade-idempotency on its embedded default.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    println!("[idempotency] (not yet built)");
    Ok(())
}
