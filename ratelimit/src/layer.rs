//! The tower middleware: rate limit each request by a key taken from the request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use crate::{Decision, RateLimiter};

/// The boxed error of [`RateLimit`] services: the inner service's error, a [`Rejected`], or
/// an [`Error`](crate::Error) of the limiter. Downcast to tell them apart.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`RateLimit`] service does with a request that is over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Fail the call at once with [`Rejected`] (carrying the decision, for a 429 with headers).
    #[default]
    Reject,
    /// Wait until admitted (`acquire`), then call the inner service.
    Wait,
}

/// A request refused by the limiter in [`Mode::Reject`]; `decision` says when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// The denied decision (render it with [`Decision::headers`]).
    pub decision: Decision,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited: retry after {:?}",
            self.decision.retry_after
        )
    }
}

impl std::error::Error for Rejected {}

/// Applies a [`RateLimiter`] to every request of the wrapped service, keyed by `key_fn(&request)`.
#[derive(Debug)]
pub struct RateLimitLayer<L, F> {
    limiter: Arc<L>,
    key_fn: Arc<F>,
    mode: Mode,
}

impl<L, F> Clone for RateLimitLayer<L, F> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            mode: self.mode,
        }
    }
}

impl<L, F> RateLimitLayer<L, F> {
    /// A layer rejecting requests over the limit ([`Mode::Reject`]).
    pub fn new(limiter: L, key_fn: F) -> Self {
        Self {
            limiter: Arc::new(limiter),
            key_fn: Arc::new(key_fn),
            mode: Mode::Reject,
        }
    }

    /// Chooses what happens to requests over the limit.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl<S, L, F> Layer<S> for RateLimitLayer<L, F> {
    type Service = RateLimit<S, L, F>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            mode: self.mode,
        }
    }
}

/// The service made by [`RateLimitLayer`].
///
/// `poll_ready` is the inner service's; the limit is decided in the response future, before the
/// inner call. Each call uses a clone of the inner service taken when the call starts (as
/// tower's buffer-free middlewares do), so the service must be `Clone`.
#[derive(Debug)]
pub struct RateLimit<S, L, F> {
    inner: S,
    limiter: Arc<L>,
    key_fn: Arc<F>,
    mode: Mode,
}

impl<S: Clone, L, F> Clone for RateLimit<S, L, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            mode: self.mode,
        }
    }
}

impl<S, L, F> RateLimit<S, L, F> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, L, F, K, Req> Service<Req> for RateLimit<S, L, F>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    L: RateLimiter + 'static,
    F: Fn(&Req) -> K,
    K: AsRef<str> + Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key_fn)(&req);
        // The clone takes the place of the service that was driven ready; the ready one handles
        // this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let mode = self.mode;
        Box::pin(async move {
            let decision = match mode {
                Mode::Reject => limiter.check(key.as_ref()).await,
                Mode::Wait => limiter.acquire(key.as_ref()).await,
            };
            match decision {
                Ok(d) if d.allowed => inner.call(req).await.map_err(Into::into),
                Ok(d) => Err(Box::new(Rejected { decision: d }) as BoxError),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }
}
