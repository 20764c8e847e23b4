//! The ratelimit part of the quick start.

/// Shows palisade-ratelimit on its embedded default.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    println!("[ratelimit] (not yet built)");
    Ok(())
}
