//! `palisade jobs`: the jobs that run under `palisade run` (or `run_exclusive`) right now.

use crate::backend::BackendArgs;
use crate::exit::{CliError, INTERNAL};
use clap::Args;
use futures::StreamExt;
use palisade_lock::{Holder, JobEvent, JobInfo};
use std::io::Write;
use std::time::Duration;

/// Flags of `palisade jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,

    /// After the list, print Started/Finished/Expired events as they happen (until Ctrl-C).
    #[arg(long)]
    pub watch: bool,

    /// Also list who waits for each job's lock, in arrival order (etcd; `flock` does not tell
    /// about waiters on the file backend).
    #[arg(long)]
    pub waiters: bool,

    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Lists (and optionally watches) the running jobs.
pub async fn jobs(args: JobsArgs) -> Result<u8, CliError> {
    let coordinator = args.backend.coordinator(Duration::from_secs(30)).await?;
    let registry = coordinator.registry();
    // Subscribe before listing, so that nothing that happens in between is missed.
    let mut events = args.watch.then(|| registry.watch());
    let running = registry.running().await?;
    // Each lock's queue once, however many of its holders run (a semaphore has several). A lock
    // and a semaphore may share a name (they are apart in the store): keyed by both.
    let mut waiting: Vec<((String, bool), Vec<Holder>)> = Vec::new();
    let key = |job: &JobInfo| (job.lock.clone(), job.permits.is_some());
    if args.waiters {
        for job in &running {
            if waiting.iter().any(|(k, _)| *k == key(job)) {
                continue;
            }
            // A lock's contenders are its holder and then its waiters; a semaphore's waiters
            // are all waiting (its holders are listed as running jobs).
            let queue = match job.permits {
                Some(permits) => coordinator.semaphore(&job.lock, permits)?.waiters().await?,
                None => coordinator
                    .contenders(&job.lock)
                    .await?
                    .into_iter()
                    .skip(1)
                    .collect(),
            };
            waiting.push((key(job), queue));
        }
    }
    let queue_of = |job: &JobInfo| {
        waiting
            .iter()
            .find(|(k, _)| *k == key(job))
            .map(|(_, queue)| queue.as_slice())
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        for job in &running {
            let mut line = json_value(None, job);
            if let (Some(queue), Some(map)) = (queue_of(job), line.as_object_mut()) {
                let queue: Vec<serde_json::Value> = queue.iter().map(waiter_json).collect();
                map.insert("waiters".into(), queue.into());
            }
            writeln!(out, "{line}").map_err(io)?;
        }
    } else {
        print_table(
            &mut out,
            &["NAME", "HOST", "PID", "SINCE", "TOKEN", "COMMAND"],
            &rows(&running, |j| (lock_label(j), token(j))),
        )
        .map_err(io)?;
        if args.waiters {
            let rows: Vec<[String; 6]> = waiting
                .iter()
                .flat_map(|((lock, _), queue)| queue.iter().map(|w| waiter_row(lock, w)))
                .collect();
            writeln!(out).map_err(io)?;
            print_table(
                &mut out,
                &["WAITING FOR", "HOST", "PID", "SINCE", "JOB", "COMMAND"],
                &rows,
            )
            .map_err(io)?;
        }
    }
    out.flush().map_err(io)?;
    drop(out);
    if let Some(events) = events.as_mut() {
        while let Some(event) = events.next().await {
            let (kind, job) = match &event {
                JobEvent::Started(j) => ("started", j),
                JobEvent::Finished(j) => ("finished", j),
                JobEvent::Expired(j) => ("expired", j),
                _ => continue,
            };
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(out, "{}", json_line(Some(kind), job)).map_err(io)?;
            } else {
                writeln!(
                    out,
                    "{:<9} {} (job `{}` on {} pid {}, token {})",
                    kind.to_uppercase(),
                    job.lock,
                    job.name,
                    job.host,
                    job.pid,
                    token(job)
                )
                .map_err(io)?;
            }
            out.flush().map_err(io)?;
        }
    }
    Ok(0)
}

fn io(error: std::io::Error) -> CliError {
    CliError::new(INTERNAL, format!("writing to stdout: {error}"))
}

/// The lock a job holds, and for a semaphore's holder the number of slots.
fn lock_label(job: &JobInfo) -> String {
    match job.permits {
        Some(n) => format!("{} ({n} slots)", job.lock),
        None => job.lock.clone(),
    }
}

fn token(job: &JobInfo) -> String {
    job.fencing_token
        .map_or_else(|| "-".into(), |t| t.to_string())
}

/// A waiter in `--json`: its job, or `{"registered": false}` for a contender that stored no job
/// (a library user's plain `acquire`).
fn waiter_json(waiter: &Holder) -> serde_json::Value {
    match waiter.job_info() {
        Some(job) => serde_json::to_value(job).unwrap_or_default(),
        None => serde_json::json!({ "registered": false }),
    }
}

/// A waiter's table row: its job, or dashes for a contender that stored no job.
fn waiter_row(lock: &str, waiter: &Holder) -> [String; 6] {
    match waiter.job_info() {
        Some(job) => {
            let mut row = rows(std::slice::from_ref(&job), |j| {
                (lock.into(), j.name.clone())
            });
            std::mem::take(&mut row[0])
        }
        None => [
            lock.into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "(not a registered job)".into(),
        ],
    }
}

fn json_value(event: Option<&str>, job: &JobInfo) -> serde_json::Value {
    let mut value = serde_json::to_value(job).unwrap_or_default();
    if let (Some(event), Some(map)) = (event, value.as_object_mut()) {
        map.insert("event".into(), event.into());
    }
    value
}

fn json_line(event: Option<&str>, job: &JobInfo) -> String {
    json_value(event, job).to_string()
}

/// Table rows of `jobs`: the first column and the fifth from `pick`, the others the job's.
fn rows(jobs: &[JobInfo], pick: impl Fn(&JobInfo) -> (String, String)) -> Vec<[String; 6]> {
    jobs.iter()
        .map(|j| {
            let (first, fifth) = pick(j);
            [
                first,
                j.host.clone(),
                j.pid.to_string(),
                humantime::format_rfc3339_seconds(j.started_at()).to_string(),
                fifth,
                j.command.join(" "),
            ]
        })
        .collect()
}

fn print_table(
    out: &mut impl Write,
    header: &[&str; 6],
    rows: &[[String; 6]],
) -> std::io::Result<()> {
    let header = header.map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
