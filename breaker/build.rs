//! Declares the `loom` cfg so that `#[cfg(loom)]` does not trip the `unexpected_cfgs` lint.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
