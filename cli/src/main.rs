//! The `palisade` command: guard any job with a lock, a run-once key or a rate limit.
//!
//! It will hold `palisade run --lock`, `jobs`, `once`, `limit` and `publish`.

fn main() {
    eprintln!("palisade: no subcommands yet");
}
