//! The object-store target: uploads under final, unique names; the commit as a conditional put
//! of the manifest that reads the manifest back whenever the answer is not a plain success; the
//! orphan sweep of `open`, timed on the store's own clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};
use tracing::{debug, info, warn};

use crate::error::{Error, Result, io, store as store_err};
use crate::hash::{ContentHash, READ_CHUNK};
use crate::layout::{
    MANIFEST_FILE, STAGING_DIR, is_data_object_name, join_prefix, object_key, relative_key,
};
use crate::manifest::Manifest;
use crate::storage::{blocking, read_object_manifest};

use super::plan::Plan;

/// Inputs up to this size are uploaded with one put; larger ones in a multipart upload.
pub(crate) const SINGLE_PUT: usize = 8 << 20;

/// A writer's place in a dataset on an object store.
#[derive(Debug)]
pub(crate) struct ObjectTarget {
    store: Arc<dyn ObjectStore>,
    base: ObjPath,
    prefix: String,
    /// The dataset's key prefix.
    dir: ObjPath,
    manifest_key: ObjPath,
    /// The e-tag/version of the manifest read at open (`None`: there was none).
    version: Option<UpdateVersion>,
    /// Its generation (0: none).
    base_generation: u64,
    /// When it was written, on the store's clock (ms since the epoch).
    base_written_at_ms: Option<i64>,
    run_id: String,
}

/// How a commit ended, as far as the store told.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The manifest was written (also when the store said otherwise and reading it back showed
    /// our commit id).
    Committed,
    /// Nothing to write.
    Nothing,
}

impl ObjectTarget {
    /// Opens the dataset under `prefix`: refuses nested datasets, reads the manifest and sweeps
    /// unreferenced objects older than `grace` on the store's clock.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        base: ObjPath,
        prefix: &str,
        run_id: &str,
        accept: bool,
        grace: Duration,
    ) -> Result<(Option<Manifest>, Self)> {
        let dir = object_key(&base, prefix, "")?;
        let manifest_key = object_key(&base, prefix, MANIFEST_FILE)?;
        let mut target = Self {
            store,
            base,
            prefix: prefix.to_string(),
            dir,
            manifest_key,
            version: None,
            base_generation: 0,
            base_written_at_ms: None,
            run_id: run_id.to_string(),
        };
        target.check_ancestors().await?;
        let listed: Vec<object_store::ObjectMeta> = target
            .store
            .list(Some(&target.dir))
            .try_collect()
            .await
            .map_err(store_err("list", &target.dir))?;
        if let Some(inner) = listed.iter().find_map(|m| {
            let rel = relative_key(&target.dir, &m.location)?;
            rel.strip_suffix(&format!("/{MANIFEST_FILE}"))
        }) {
            return Err(Error::NestedDataset {
                prefix: prefix.to_string(),
                relation: "contains",
                other: join_prefix(prefix, inner),
                evidence: object_key(&target.base, prefix, &format!("{inner}/{MANIFEST_FILE}"))?
                    .to_string(),
            });
        }
        let (manifest, version, written_at) = target.read_manifest(accept).await?;
        target.version = version;
        target.base_written_at_ms = written_at;
        target.base_generation = manifest.as_ref().map_or(0, |m| m.generation);
        if let Some(m) = &manifest {
            target.sweep(m, listed, run_id, grace).await;
        }
        Ok((manifest, target))
    }

    /// The key of an object of the dataset.
    pub fn key(&self, object: &str) -> Result<ObjPath> {
        object_key(&self.base, &self.prefix, object)
    }

    /// Refuses a dataset that lies inside another: a manifest at any key prefix above it, up to
    /// the bucket's root (the store's base path counts too: `s3://b/tables/sales/eu` lies inside
    /// a dataset at `s3://b/tables/sales`).
    async fn check_ancestors(&self) -> Result<()> {
        let full = self.dir.as_ref();
        if full.is_empty() {
            return Ok(());
        }
        let segments: Vec<&str> = full.split('/').collect();
        for n in 0..segments.len() {
            let above = segments[..n].join("/");
            let key = object_key(&ObjPath::default(), &above, MANIFEST_FILE)?;
            match self.store.head(&key).await {
                Ok(_) => {
                    return Err(Error::NestedDataset {
                        prefix: full.to_string(),
                        relation: "lies inside",
                        other: above,
                        evidence: key.to_string(),
                    });
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err("read", &key)(e)),
            }
        }
        Ok(())
    }

    /// Reads the manifest, its e-tag/version and when it was written (store clock, ms).
    pub async fn read_manifest(
        &self,
        accept: bool,
    ) -> Result<(Option<Manifest>, Option<UpdateVersion>, Option<i64>)> {
        match read_object_manifest(&self.store, &self.manifest_key, accept).await? {
            Some(read) => Ok((
                Some(read.manifest),
                Some(read.version),
                Some(read.written_at_ms),
            )),
            None => Ok((None, None, None)),
        }
    }

    /// When the manifest this run started from was written (store clock, ms since the epoch).
    pub fn base_written_at_ms(&self) -> Option<i64> {
        self.base_written_at_ms
    }

    /// The store's clock now (ms since the epoch), read from a probe object.
    pub async fn clock_ms(&self) -> Result<i64> {
        Ok(self
            .store_now(&self.run_id)
            .await?
            .last_modified
            .timestamp_millis())
    }

    /// Deletes unreferenced data objects (leftovers of crashed runs) that are older than `grace`
    /// **on the store's clock**: the store's time is read from an object written now, so a
    /// local clock that is ahead (or a store that is behind) never shortens the grace.
    async fn sweep(
        &self,
        m: &Manifest,
        listed: Vec<object_store::ObjectMeta>,
        run_id: &str,
        grace: Duration,
    ) {
        // Retained versions are not orphans: readers of older manifests may still read them.
        let live: BTreeSet<&str> = m.kept_objects().collect();
        let candidates: Vec<object_store::ObjectMeta> = listed
            .into_iter()
            .filter(|meta| {
                let Some(rel) = relative_key(&self.dir, &meta.location) else {
                    return false;
                };
                let file = rel.rsplit('/').next().unwrap_or(rel);
                let ours = is_data_object_name(file);
                ours && !live.contains(rel)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let now = match self.store_now(run_id).await {
            Ok(probe) => probe.last_modified,
            Err(e) => {
                warn!(error = %e, "could not read the store's clock; orphans are swept later");
                return;
            }
        };
        for meta in candidates {
            let age = now - meta.last_modified;
            if age.num_milliseconds() >= grace.as_millis() as i64 {
                debug!(object = %meta.location, age_ms = age.num_milliseconds(), "sweeping orphan");
                if let Err(e) = self.store.delete(&meta.location).await {
                    warn!(object = %meta.location, error = %e, "could not delete orphan");
                }
            }
        }
    }

    /// The store's current time, as the `last_modified` of a probe object written now (then
    /// deleted), `_staging/clock-<run>` under the dataset (Hive readers skip `_` names).
    async fn store_now(&self, run_id: &str) -> Result<object_store::ObjectMeta> {
        let probe = self.key(&format!("{STAGING_DIR}/clock-{run_id}"))?;
        self.store
            .put(&probe, PutPayload::from_static(b""))
            .await
            .map_err(store_err("put", &probe))?;
        let meta = self.store.head(&probe).await;
        if let Err(e) = self.store.delete(&probe).await {
            warn!(object = %probe, error = %e, "could not delete the clock probe");
        }
        meta.map_err(store_err("read", &probe))
    }

    /// Uploads `bytes` to `object` with one put.
    pub async fn put(&self, object: &str, bytes: Bytes) -> Result<()> {
        let key = self.key(object)?;
        self.store
            .put(&key, PutPayload::from_bytes(bytes))
            .await
            .map_err(store_err("put", &key))?;
        Ok(())
    }

    /// Uploads the local file `path` to `object` while hashing what is read (the crate's one
    /// read loop, on a blocking thread, handing chunks to the upload): the hash is of exactly
    /// the bytes uploaded. At most a few chunks in memory at a time.
    pub async fn upload_file(
        &self,
        object: &str,
        path: &std::path::Path,
    ) -> Result<(ContentHash, u64)> {
        let key = self.key(object)?;
        let p = path.to_path_buf();
        let file = blocking(move || std::fs::File::open(&p).map_err(io("open", &p))).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let p = path.to_path_buf();
        let reader = tokio::task::spawn_blocking(move || {
            let mut pending: Vec<u8> = Vec::with_capacity(SINGLE_PUT);
            let result = ContentHash::of_reader(file, |chunk| {
                pending.extend_from_slice(chunk);
                if pending.len() >= SINGLE_PUT {
                    let full = std::mem::replace(&mut pending, Vec::with_capacity(SINGLE_PUT));
                    tx.blocking_send(Bytes::from(full))
                        .map_err(|_| std::io::Error::other("the upload stopped"))?;
                }
                Ok(())
            });
            if result.is_ok() && !pending.is_empty() {
                let _ = tx.blocking_send(Bytes::from(pending));
            }
            result.map_err(io("read", &p))
        });
        let first = rx.recv().await.unwrap_or_default();
        let upload = if first.len() < SINGLE_PUT {
            // Small: one put (the reader has finished).
            self.store
                .put(&key, PutPayload::from_bytes(first))
                .await
                .map(|_| ())
                .map_err(store_err("put", &key))
        } else {
            self.multipart(&key, first, &mut rx).await
        };
        drop(rx);
        let read = reader.await.map_err(|e| Error::Io {
            op: "read",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        match (read, upload) {
            (Ok(done), Ok(())) => Ok(done),
            (Err(e), Ok(())) => {
                // A read error after a complete-looking upload: the object is not ours to keep.
                let _ = self.store.delete(&key).await;
                Err(e)
            }
            (Err(e), Err(_)) | (Ok(_), Err(e)) => Err(e),
        }
    }

    async fn multipart(
        &self,
        key: &ObjPath,
        first: Bytes,
        rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<()> {
        let upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(store_err("start multipart upload", key))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, SINGLE_PUT);
        writer.put(first);
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = writer.wait_for_capacity(4).await {
                let _ = writer.abort().await;
                return Err(store_err("multipart upload", key)(e));
            }
            writer.put(chunk);
        }
        writer
            .finish()
            .await
            .map(|_| ())
            .map_err(store_err("finish multipart upload", key))
    }

    /// Deletes objects of the dataset; a failure is logged (the sweep of a later `open` gets it).
    pub async fn delete(&self, objects: &[String]) {
        for o in objects {
            let Ok(key) = self.key(o) else { continue };
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    warn!(object = %key, error = %e, "could not delete; it will be swept later")
                }
            }
        }
    }

    /// Commits `plan` with a conditional put of the manifest. `ours` are the objects this run
    /// uploaded, `check` the writer's check of the manifest found against its base, `recheck`
    /// whether to make sure first that the uploads are still there (an old run's uploads may
    /// have been swept).
    ///
    /// When the put is not answered with success, the manifest is read back: our commit id (or
    /// one of our unique objects) in it means the write landed, whatever the answer said; another
    /// generation means someone else committed (then only our objects that it does not name are
    /// deleted); anything else is [`Error::CommitUnknown`] and nothing is deleted.
    pub async fn commit(
        &self,
        plan: &Plan,
        ours: &[String],
        recheck: bool,
        accept: bool,
        check: impl Fn(Option<&Manifest>) -> Result<()>,
    ) -> Result<Outcome> {
        let (current, version, _) = match self.read_manifest(accept).await {
            Ok(read) => read,
            Err(e) => {
                self.delete(ours).await;
                return Err(e);
            }
        };
        let refused = check(current.as_ref()).and_then(|()| {
            if current.is_some() && version != self.version {
                // Same generation, another e-tag: rewritten by hand or by another writer.
                Err(self.conflict(current.as_ref()))
            } else {
                Ok(())
            }
        });
        if let Err(e) = refused {
            self.delete(ours).await;
            return Err(e);
        }
        let Some(next) = &plan.next else {
            return Ok(Outcome::Nothing);
        };
        if recheck {
            for object in ours {
                let key = self.key(object)?;
                if let Err(e) = self.store.head(&key).await {
                    self.delete(ours).await;
                    return Err(store_err("re-check", &key)(e));
                }
            }
        }
        let mode = match &self.version {
            Some(v) => PutMode::Update(v.clone()),
            None => PutMode::Create,
        };
        let put = self
            .store
            .put_opts(
                &self.manifest_key,
                PutPayload::from(next.encode()),
                PutOptions::from(mode),
            )
            .await;
        let error = match put {
            Ok(_) => {
                self.delete(&plan.obsolete).await;
                return Ok(Outcome::Committed);
            }
            Err(e @ object_store::Error::NotImplemented { .. })
            | Err(e @ object_store::Error::NotSupported { .. }) => {
                self.delete(ours).await;
                return Err(Error::ConditionalPutUnsupported {
                    store: self.store.to_string(),
                    detail: e.to_string(),
                });
            }
            Err(e) => e,
        };
        self.resolve(plan, next, ours, accept, &check, error).await
    }

    /// After a manifest put that was not answered with success: what happened?
    async fn resolve(
        &self,
        plan: &Plan,
        next: &Manifest,
        ours: &[String],
        accept: bool,
        check: &impl Fn(Option<&Manifest>) -> Result<()>,
        error: object_store::Error,
    ) -> Result<Outcome> {
        let answer = error.to_string();
        let found = match self.read_manifest(accept).await {
            Ok((found, _, _)) => found,
            Err(read) => {
                return Err(Error::CommitUnknown {
                    prefix: self.prefix.clone(),
                    detail: format!(
                        "the store answered {answer}, and reading it back failed: {read}"
                    ),
                });
            }
        };
        let named: BTreeSet<&str> = found.iter().flat_map(Manifest::kept_objects).collect();
        let landed = found.as_ref().is_some_and(|m| {
            m.commit_id == next.commit_id || ours.iter().any(|o| named.contains(o.as_str()))
        });
        if landed {
            info!(prefix = %self.prefix, error = %answer, "the manifest write landed although the store answered with an error");
            let obsolete: Vec<String> = plan
                .obsolete
                .iter()
                .filter(|o| !named.contains(o.as_str()))
                .cloned()
                .collect();
            self.delete(&obsolete).await;
            return Ok(Outcome::Committed);
        }
        let base_generation = self.base_generation;
        let moved_on = found.as_ref().map_or(0, |m| m.generation) != base_generation;
        if moved_on {
            // Someone else committed: our conditional put can never apply any more.
            let unnamed: Vec<String> = ours
                .iter()
                .filter(|o| !named.contains(o.as_str()))
                .cloned()
                .collect();
            self.delete(&unnamed).await;
            check(found.as_ref())?;
            return Err(self.conflict(found.as_ref()));
        }
        Err(Error::CommitUnknown {
            prefix: self.prefix.clone(),
            detail: format!(
                "the store answered {answer}, and the manifest is still generation {base_generation} (the write may still land)"
            ),
        })
    }

    fn conflict(&self, found: Option<&Manifest>) -> Error {
        Error::Conflict {
            prefix: self.prefix.clone(),
            expected: (self.base_generation > 0).then_some(self.base_generation),
            found: found.map(|m| m.generation),
        }
    }
}

/// The chunk size of [`ContentHash::of_reader`] divides the upload chunk size.
const _: () = assert!(SINGLE_PUT.is_multiple_of(READ_CHUNK));
