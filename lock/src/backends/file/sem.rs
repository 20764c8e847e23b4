//! A semaphore's slots on one host: `sem/<name>.slot-<i>` for `i` in `0..permits`, each a file
//! lock as in `flock.rs`. The slot file holds the permits its holder asked for (so holders that
//! disagree can tell), and `sem/<name>.slot-<i>.holder` the holder's token and value. Only the
//! head of the semaphore's queue (`sem/<name>.lock`) takes slots, so two contenders never race
//! for the same free slot; the queue's fencing counter is the slots' token.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::flock::{FileHeld, encode, is_locked, lock_current_file, read_holder, replace_file};
use crate::backend::{Holder, SlotTry};
use crate::error::LockError;

/// A held slot, as `holders` finds it.
pub(super) struct SlotHolder {
    /// The permits its holder asked for; `None` while it is being written.
    pub(super) permits: Option<u32>,
    pub(super) holder: Holder,
}

fn slot_path(dir: &Path, base: &str, index: u32) -> PathBuf {
    dir.join("sem").join(format!("{base}.slot-{index}"))
}

fn holder_path(slot: &Path) -> PathBuf {
    let mut name = slot.as_os_str().to_owned();
    name.push(".holder");
    PathBuf::from(name)
}

/// The held slots of semaphore `name`, in token order. `encode` never puts a `.` into a name,
/// so `<base>.slot-` belongs to this name alone.
pub(super) fn holders(dir: &Path, name: &str) -> Result<Vec<SlotHolder>, LockError> {
    let sem = dir.join("sem");
    let prefix = format!("{}.slot-", encode(name));
    let entries = std::fs::read_dir(&sem).map_err(|e| LockError::io("read", &sem, e))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(index) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|i| i.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let path = sem.join(format!("{prefix}{index}"));
        if is_locked(&path)? != Some(true) {
            continue;
        }
        let mut text = String::new();
        let _ = File::open(&path).and_then(|mut f| f.read_to_string(&mut text));
        found.push(SlotHolder {
            permits: text.trim().parse().ok(),
            holder: read_holder(&holder_path(&path)).unwrap_or(Holder {
                value: Vec::new(),
                fencing_token: 0,
            }),
        });
    }
    found.sort_by_key(|h| h.holder.fencing_token);
    Ok(found)
}

/// Takes a free slot of `name` for the head of its queue (whose token is `token`), if any.
pub(super) fn take(
    dir: &Path,
    name: &str,
    permits: u32,
    token: u64,
    value: &[u8],
) -> Result<SlotTry, LockError> {
    let held = holders(dir, name)?;
    if let Some(theirs) = held
        .iter()
        .filter_map(|h| h.permits)
        .find(|p| *p != permits)
    {
        return Err(LockError::PermitsMismatch {
            name: name.to_string(),
            ours: permits,
            theirs,
        });
    }
    let base = encode(name);
    for index in 0..permits {
        let path = slot_path(dir, &base, index);
        let Some(file) = lock_current_file(&path)? else {
            continue;
        };
        let record = format!("{permits}\n");
        file.set_len(0)
            .and_then(|()| file.write_all_at(record.as_bytes(), 0))
            .map_err(|e| LockError::io("write", &path, e))?;
        let holder = holder_path(&path);
        let mut text = format!("{token}\n").into_bytes();
        text.extend_from_slice(value);
        replace_file(&holder, &text, false)?;
        let held = FileHeld::new(file, &path, holder, token, None)?;
        return Ok(SlotTry::Taken(Box::new(held)));
    }
    Ok(SlotTry::Full {
        seen: 0,
        holder: held.into_iter().next().map(|h| h.holder),
    })
}
