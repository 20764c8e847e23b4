//! `palisade verify DEST`: a read-only check of a published dataset, for nightly checks of a
//! lake. The check itself is palisade-idempotency's `verify`.

use clap::Args;
use palisade_idempotency::{Problem, Verification};

use super::{open_store, shown};
use crate::exit::{BAD_INPUT, CliError, INTERNAL, UNSOUND};

/// Flags of `palisade verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The dataset (as for `publish`).
    #[arg(value_name = "DEST")]
    pub dest: String,

    /// Also read every object and compare its BLAKE3 with the manifest's (default: sizes only).
    #[arg(long)]
    pub hashes: bool,

    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// Runs `palisade verify`: exit 0 when the dataset is sound, 65 when it is not, 66 when there is
/// no dataset at DEST (nothing was ever published there: a mistyped URL must not pass a check).
pub async fn verify(args: VerifyArgs) -> Result<u8, CliError> {
    let store = open_store(&args.dest)?;
    let v = palisade_idempotency::verify(&store, "", args.hashes).await?;
    let no_dataset = v.generation == 0 && v.pending_commit.is_none();
    if args.json {
        let mut value =
            serde_json::to_value(&v).map_err(|e| CliError::new(INTERNAL, e.to_string()))?;
        value["dest"] = args.dest.clone().into();
        value["sound"] = (v.is_sound() && !no_dataset).into();
        value["dataset"] = (!no_dataset).into();
        println!("{value}");
    } else if no_dataset {
        println!(
            "{}: NO DATASET: nothing was ever published there (no {MANIFEST}); check the URL",
            args.dest
        );
    } else {
        print!("{}", report(&args.dest, &v));
    }
    Ok(match () {
        () if no_dataset => BAD_INPUT,
        () if v.is_sound() => 0,
        () => UNSOUND,
    })
}

/// The manifest's file name, as `palisade verify` names it.
const MANIFEST: &str = "_manifest.json";

fn report(dest: &str, v: &Verification) -> String {
    let what = if v.hashes_checked {
        "sizes and hashes"
    } else {
        "sizes (add --hashes to compare contents)"
    };
    let verdict = if v.is_sound() { "sound" } else { "NOT SOUND" };
    let mut out = format!(
        "{dest}: {verdict}: generation {}, {} objects ({} bytes), {what} checked\n",
        v.generation, v.objects, v.bytes
    );
    for p in &v.problems {
        let line = match p {
            Problem::Missing { object } => format!("missing         {}", shown(dest, object)),
            Problem::WrongSize {
                object,
                expected,
                found,
            } => format!(
                "wrong size      {} ({found} bytes, the manifest says {expected})",
                shown(dest, object)
            ),
            Problem::WrongHash { object } => {
                format!("changed content {}", shown(dest, object))
            }
            Problem::Unreadable { object, error } => {
                format!("unreadable      {}: {error}", shown(dest, object))
            }
            other => format!("{other:?}"),
        };
        out.push_str(&format!("  {line}\n"));
    }
    if let Some(generation) = v.pending_commit {
        out.push_str(&format!(
            "  a decided commit (generation {generation}) is not rolled forward yet: the next \
             publish or reader completes it\n"
        ));
    }
    for r in &v.retained {
        let since = match r.retired_at_ms {
            Some(ms) => format!(
                "since {}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
                )
            ),
            None => "by the latest commit".to_string(),
        };
        out.push_str(&format!(
            "  retained        {} objects replaced at generation {} ({since}), kept for readers until the retention passes\n",
            r.objects, r.generation
        ));
    }
    for o in &v.unreferenced {
        out.push_str(&format!(
            "  unreferenced    {} (not in the manifest)\n",
            shown(dest, o)
        ));
    }
    out
}
