//! Where a writer's data goes: a local directory or an object store. The writer's API calls
//! these operations; each one is carried out by the [`local`](super::local) or
//! [`object`](super::object) module (local file work on tokio's blocking pool).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result, io};
use crate::hash::ContentHash;
use crate::manifest::{FileEntry, Manifest};
use crate::storage::{Backend, blocking, remove_file_if_exists, write_unsynced};

use super::PartFile;
use super::local::{LocalTarget, StagedDir};
use super::object::ObjectTarget;
use super::plan::Plan;

/// A writer's place in its dataset.
#[derive(Debug)]
pub(crate) enum Target {
    Local(LocalTarget),
    Object(ObjectTarget),
}

/// Where streamed or copied content waits until it is hashed: the run's staging area (local),
/// or a temporary file (object stores).
#[derive(Debug)]
pub(crate) enum Spool {
    Staged(PathBuf),
    Temp(tempfile::NamedTempFile),
}

impl Spool {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Spool::Staged(p) => p,
            Spool::Temp(t) => t.path(),
        }
    }
}

/// What a writer needs to know to commit on either target.
pub(crate) struct CommitArgs<'a> {
    pub plan: &'a Plan,
    /// Local: each written partition's staged directory.
    pub staged: Vec<(String, StagedDir)>,
    /// Object stores: the objects this run uploaded.
    pub uploaded: Vec<String>,
    /// Object stores: make sure the uploads are still there first (an old run's may have been
    /// swept as orphans).
    pub recheck: bool,
    pub lock_timeout: Duration,
    /// Accept a manifest of another version.
    pub accept: bool,
    /// Local: how long old versions are kept in `_staging/retired/`.
    pub retain: Duration,
}

impl Target {
    /// Opens the dataset (see [`LocalTarget::open`] and [`ObjectTarget::open`]).
    pub async fn open(
        backend: Backend,
        prefix: &str,
        run_id: &str,
        lock_timeout: Duration,
        accept: bool,
        orphan_grace: Duration,
        retain: Duration,
    ) -> Result<(Option<Manifest>, Target)> {
        match backend {
            Backend::Local(root) => {
                let (p, run) = (prefix.to_string(), run_id.to_string());
                let (m, t) = blocking(move || {
                    LocalTarget::open(&root, &p, &run, lock_timeout, accept, retain)
                })
                .await?;
                Ok((m, Target::Local(t)))
            }
            Backend::Object { store, base } => {
                let (m, t) =
                    ObjectTarget::open(store, base, prefix, run_id, accept, orphan_grace).await?;
                Ok((m, Target::Object(t)))
            }
        }
    }

    /// When the manifest this run started from was written, on the store's clock (object
    /// stores).
    pub fn base_written_at_ms(&self) -> Option<i64> {
        match self {
            Target::Local(_) => None,
            Target::Object(t) => t.base_written_at_ms(),
        }
    }

    /// The store's clock now (object stores; a probe object is written and deleted).
    pub async fn clock_ms(&self) -> Result<Option<i64>> {
        match self {
            Target::Local(_) => Ok(None),
            Target::Object(t) => t.clock_ms().await.map(Some),
        }
    }

    /// Whether partitions are replaced as whole directories (a local directory).
    pub fn whole_directories(&self) -> bool {
        matches!(self, Target::Local(_))
    }

    /// Writes a single-object partition version held in memory as `object`.
    pub async fn stage_bytes(&self, object: &str, bytes: Bytes) -> Result<Option<StagedDir>> {
        match self {
            Target::Local(t) => {
                let (t, file) = (t.clone(), file_name(object).to_string());
                let staged = blocking(move || {
                    let spooled = t.next_path("s");
                    write_unsynced(&spooled, &bytes)?;
                    t.stage_object(&spooled, &file)
                })
                .await?;
                Ok(Some(staged))
            }
            Target::Object(t) => t.put(object, bytes).await.map(|()| None),
        }
    }

    /// A new spool file.
    pub async fn spool(&self) -> Result<Spool> {
        match self {
            Target::Local(t) => Ok(Spool::Staged(t.next_path("s"))),
            Target::Object(_) => {
                blocking(|| {
                    tempfile::NamedTempFile::new()
                        .map(Spool::Temp)
                        .map_err(io("create temporary file", std::env::temp_dir()))
                })
                .await
            }
        }
    }

    /// Writes a single-object partition version from a spool as `object`.
    pub async fn stage_spooled(&self, object: &str, spool: Spool) -> Result<Option<StagedDir>> {
        match (self, spool) {
            (Target::Local(t), Spool::Staged(path)) => {
                let (t, file) = (t.clone(), file_name(object).to_string());
                blocking(move || t.stage_object(&path, &file))
                    .await
                    .map(Some)
            }
            (Target::Object(t), spool) => t.upload_file(object, spool.path()).await.map(|_| None),
            (Target::Local(_), Spool::Temp(_)) => Err(Error::Config {
                field: "store",
                reason: "a local writer spooled to a temporary file (internal error)",
            }),
        }
    }

    /// Drops a spool whose content was unchanged.
    pub async fn drop_spool(&self, spool: Spool) -> Result<()> {
        match spool {
            Spool::Staged(p) => blocking(move || remove_file_if_exists(&p)).await,
            Spool::Temp(_) => Ok(()),
        }
    }

    /// Writes a multi-file partition: locally as `<partition>/<name>` in a staged directory, on
    /// object stores each file uploaded as `<partition>/<unique name>`. Returns the files'
    /// entries, unsorted. A file that cannot be read is [`Error::Input`] naming it.
    pub async fn stage_files(
        &self,
        partition: &str,
        files: Vec<PartFile>,
        run_id: &str,
    ) -> Result<(Vec<FileEntry>, Option<StagedDir>)> {
        match self {
            Target::Local(t) => {
                let (t, p) = (t.clone(), partition.to_string());
                let (entries, dir) = blocking(move || t.stage_files(&p, &files)).await?;
                Ok((entries, Some(dir)))
            }
            Target::Object(t) => {
                let mut entries: Vec<FileEntry> = Vec::with_capacity(files.len());
                for f in files {
                    let object = format!(
                        "{partition}/{}",
                        crate::layout::unique_name(&f.name, run_id)
                    );
                    match t.upload_file(&object, &f.path).await {
                        Ok((hash, size)) => entries.push(FileEntry {
                            name: f.name,
                            object,
                            size,
                            hash,
                        }),
                        Err(e) => {
                            let done: Vec<String> =
                                entries.iter().map(|e| e.object.clone()).collect();
                            t.delete(&done).await;
                            return Err(match e {
                                Error::Io { source, .. } => Error::Input {
                                    partition: format!(
                                        "{partition}/{} ({})",
                                        f.name,
                                        f.path.display()
                                    ),
                                    source,
                                },
                                other => other,
                            });
                        }
                    }
                }
                Ok((entries, None))
            }
        }
    }

    /// Commits (see [`LocalTarget::commit`] and [`ObjectTarget::commit`]); `check` checks the
    /// manifest found against the run's base.
    pub async fn commit(
        self,
        args: CommitArgs<'_>,
        check: impl Fn(Option<&Manifest>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        match self {
            Target::Local(t) => {
                let CommitArgs {
                    plan,
                    staged,
                    lock_timeout,
                    accept,
                    retain,
                    ..
                } = args;
                let plan = plan.clone();
                blocking(move || t.commit(&plan, &staged, lock_timeout, accept, retain, check))
                    .await
            }
            Target::Object(t) => t
                .commit(args.plan, &args.uploaded, args.recheck, args.accept, check)
                .await
                .map(|_| ()),
        }
    }

    /// Discards the run: its staging area (local), or its uploads (object stores).
    pub async fn abort(self, uploaded: &[String]) -> Result<()> {
        match self {
            Target::Local(t) => blocking(move || t.discard()).await,
            Target::Object(t) => {
                t.delete(uploaded).await;
                Ok(())
            }
        }
    }
}

/// The file name of an object (its last segment).
fn file_name(object: &str) -> &str {
    object.rsplit('/').next().unwrap_or(object)
}

/// The hash of content held in memory; large content is hashed on the blocking pool.
pub(crate) async fn hash_bytes(bytes: Bytes) -> Result<ContentHash> {
    if bytes.len() < super::object::SINGLE_PUT {
        return Ok(ContentHash::of_bytes(&bytes));
    }
    blocking(move || Ok(ContentHash::of_bytes(&bytes))).await
}
