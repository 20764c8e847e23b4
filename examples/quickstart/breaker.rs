//! The breaker part of the quick start.

/// Shows palisade-breaker on its embedded default.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    println!("[breaker] (not yet built)");
    Ok(())
}
