//! The lock part of the quick start.

/// Shows palisade-lock on its embedded default.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    println!("[lock] (not yet built)");
    Ok(())
}
