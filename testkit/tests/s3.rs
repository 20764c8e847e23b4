//! The S3-compatible server (moto) against object_store's `AmazonS3`, the client palisade uses:
//! objects, the conditional writes a manifest relies on, and kill, pause, resume and restart.
//!
//! What moto does of S3's conditional writes is asserted here, not assumed: `If-None-Match: *`
//! (`PutMode::Create`) and `If-Match` (`PutMode::Update`) are both honoured, with the status
//! codes real S3 uses, when the writes come one after another. One difference from real S3 was
//! measured by hand (moto 5.2.1, 6 writers per round, 8 MB bodies: 2 to 4 rounds in 10 had more
//! than one winner): moto checks a condition and then writes without a lock, so conditional
//! writes that race on one key are not exclusive. Races are therefore tested on object_store's
//! in-memory store, and moto is used for conditional writes that come one after another.

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    ClientOptions, Error as StoreError, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use palisade_testkit::S3;
use std::time::Duration;
use tokio::time::timeout;

const CALL: Duration = Duration::from_secs(10);
const STUCK: Duration = Duration::from_millis(700);

/// A client for `bucket` on the testkit's server, failing fast (no retries, short timeouts)
/// so that a killed or paused server shows up as an error at once.
fn store(s3: &S3, bucket: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_region(s3.region())
        .with_bucket_name(bucket)
        .with_access_key_id(s3.access_key())
        .with_secret_access_key(s3.secret_key())
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_client_options(
            ClientOptions::new()
                .with_timeout(Duration::from_secs(5))
                .with_connect_timeout(Duration::from_secs(1)),
        )
        // After with_client_options, which replaces the whole ClientOptions (allow_http too).
        .with_allow_http(true)
        .with_retry(RetryConfig {
            max_retries: 0,
            retry_timeout: Duration::from_secs(1),
            ..RetryConfig::default()
        })
        .build()
        .expect("the AmazonS3 configuration is valid")
}

async fn read(store: &AmazonS3, path: &Path) -> Result<Vec<u8>, StoreError> {
    let result = timeout(CALL, store.get(path))
        .await
        .expect("get answered in time")?;
    Ok(result.bytes().await?.to_vec())
}

async fn put(
    store: &AmazonS3,
    path: &Path,
    data: &'static [u8],
    mode: PutMode,
) -> Result<String, StoreError> {
    let put = store.put_opts(path, PutPayload::from_static(data), PutOptions::from(mode));
    let result = timeout(CALL, put).await.expect("put answered in time")?;
    Ok(result.e_tag.expect("S3 returns an e-tag for every put"))
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_put_get_list_delete() {
    let s3 = S3::start().expect("moto_server starts (run scripts/setup if it is missing)");
    assert_eq!(s3.endpoint(), format!("http://127.0.0.1:{}", s3.port()));
    s3.create_bucket("datasets").expect("create bucket");
    s3.create_bucket("datasets")
        .expect("creating an existing bucket of ours succeeds, as in us-east-1");
    let invalid = s3
        .create_bucket("NO")
        .expect_err("S3 bucket names are 3+ lowercase chars");
    assert!(
        invalid.to_string().contains("InvalidBucketName"),
        "{invalid}"
    );

    let store = store(&s3, "datasets");
    let a = Path::from("table/date=2024-01-01/part-0.parquet");
    let b = Path::from("table/date=2024-01-02/part-0.parquet");
    put(&store, &a, b"first", PutMode::Overwrite)
        .await
        .expect("put a");
    put(&store, &b, b"second", PutMode::Overwrite)
        .await
        .expect("put b");
    assert_eq!(read(&store, &a).await.expect("get a"), b"first");

    let mut listed: Vec<String> = store
        .list(Some(&Path::from("table")))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .expect("list");
    listed.sort();
    assert_eq!(listed, [a.to_string(), b.to_string()]);

    store.delete(&a).await.expect("delete a");
    assert!(matches!(
        read(&store, &a).await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .delete(&a)
        .await
        .expect("deleting a missing object succeeds, as on S3");
    let other = store_for_missing_bucket(&s3);
    assert!(
        read(&other, &b).await.is_err(),
        "a bucket that was never created does not exist"
    );
}

fn store_for_missing_bucket(s3: &S3) -> AmazonS3 {
    store(s3, "never-created")
}

/// What a manifest commit needs: create-if-absent and compare-and-swap on the e-tag.
#[tokio::test(flavor = "multi_thread")]
async fn conditional_writes_as_object_store_uses_them() {
    let s3 = S3::start().expect("moto_server starts");
    s3.create_bucket("manifests").expect("create bucket");
    let store = store(&s3, "manifests");
    let manifest = Path::from("table/_manifest.json");

    // PutMode::Create = `If-None-Match: *`.
    let v1 = put(&store, &manifest, b"v1", PutMode::Create)
        .await
        .expect("create-if-absent on a new key succeeds");
    let exists = put(&store, &manifest, b"v1-again", PutMode::Create).await;
    assert!(
        matches!(exists, Err(StoreError::AlreadyExists { .. })),
        "moto honours If-None-Match: * (412 -> AlreadyExists): {exists:?}"
    );
    assert_eq!(read(&store, &manifest).await.expect("get"), b"v1");

    // PutMode::Update = `If-Match: <etag>` (S3ConditionalPut::ETagMatch).
    let update = |e_tag: &str| {
        PutMode::Update(UpdateVersion {
            e_tag: Some(e_tag.to_string()),
            version: None,
        })
    };
    let v2 = put(&store, &manifest, b"v2", update(&v1))
        .await
        .expect("a put with the current e-tag succeeds");
    assert_ne!(v1, v2);
    let stale = put(&store, &manifest, b"v2-lost", update(&v1)).await;
    assert!(
        matches!(stale, Err(StoreError::Precondition { .. })),
        "moto honours If-Match (412 -> Precondition) on a stale e-tag: {stale:?}"
    );
    assert_eq!(read(&store, &manifest).await.expect("get"), b"v2");

    // If-Match on a missing key: S3 and moto answer 404, object_store reports Precondition.
    let missing = put(&store, &Path::from("nothing-here"), b"x", update(&v2)).await;
    assert!(
        matches!(missing, Err(StoreError::Precondition { .. })),
        "If-Match on a missing key fails: {missing:?}"
    );
    assert!(matches!(
        read(&store, &Path::from("nothing-here")).await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_pause_resume_restart() {
    let s3 = S3::start().expect("moto_server starts");
    s3.create_bucket("faults").expect("create bucket");
    let store = store(&s3, "faults");
    let key = Path::from("k");
    put(&store, &key, b"v1", PutMode::Overwrite)
        .await
        .expect("put");

    s3.pause().expect("pause");
    let stuck = timeout(STUCK, store.get(&key)).await;
    assert!(
        !matches!(stuck, Ok(Ok(_))),
        "a paused server must not answer"
    );
    s3.resume().expect("resume");
    assert_eq!(read(&store, &key).await.expect("get after resume"), b"v1");

    s3.kill().expect("kill");
    assert!(s3.pid().is_none());
    assert!(
        read(&store, &key).await.is_err(),
        "a killed server must not answer"
    );
    assert!(s3.pause().is_err(), "pausing a killed server is an error");

    s3.restart().expect("restart");
    assert!(s3.pid().is_some());
    let gone = read(&store, &key).await;
    assert!(
        matches!(gone, Err(StoreError::NotFound { .. })),
        "moto keeps state in memory: a restart empties it: {gone:?}"
    );
    s3.create_bucket("faults").expect("create the bucket again");
    put(&store, &key, b"v2", PutMode::Overwrite)
        .await
        .expect("put after restart");
    assert_eq!(read(&store, &key).await.expect("get"), b"v2");
}
