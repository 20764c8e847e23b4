//! A real S3 API for the tests: moto from the testkit, and an `object_store` client for it.

use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::{ClientOptions, RetryConfig};
use palisade_testkit::S3;
use std::time::Duration;

/// An S3 client of `bucket` on `s3`, with conditional puts, a short timeout and one retry.
pub fn client(s3: &S3, bucket: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_region(s3.region())
        .with_bucket_name(bucket)
        .with_access_key_id(s3.access_key())
        .with_secret_access_key(s3.secret_key())
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(10)))
        // After with_client_options, which replaces the whole ClientOptions (allow_http too).
        .with_allow_http(true)
        .with_retry(RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
            ..RetryConfig::default()
        })
        .build()
        .expect("a valid S3 configuration")
}

/// Starts moto with the bucket `lake`.
pub async fn start() -> S3 {
    let s3 = tokio::task::spawn_blocking(S3::start)
        .await
        .expect("join")
        .expect("moto starts (scripts/setup installs moto[server])");
    s3.create_bucket("lake").expect("bucket");
    s3
}
