//! The breaker as tower middleware: [`BreakerLayer`] wraps a service in a [`BreakerService`].
//!
//! A call the breaker rejects resolves at once to [`BreakerError::Rejected`] without calling the
//! inner service; otherwise the inner service's result decides the outcome (`Ok` success, `Err`
//! failure, or a classifier of your own via [`BreakerLayer::with_classifier`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::breaker::OwnedPermit;
use crate::{BreakerError, CircuitBreaker, Outcome};

/// A [`Layer`] that puts a [`CircuitBreaker`] in front of a service.
///
/// ```
/// use palisade_breaker::{BreakerLayer, CircuitBreaker};
/// use tower::{ServiceBuilder, service_fn};
///
/// let breaker = CircuitBreaker::builder("backend").build().unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(BreakerLayer::new(breaker))
///     .service(service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req * 2) }));
/// # let _ = svc;
/// ```
#[derive(Debug, Clone)]
pub struct BreakerLayer<C = Classify> {
    breaker: CircuitBreaker,
    classify: C,
}

/// The classifier of a [`BreakerLayer`] that has none of its own: `Ok` success, `Err` failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct Classify;

/// Decides how a service's result counts in the breaker.
pub trait Classifier<T, E> {
    /// How `result` counts.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E> Classifier<T, E> for Classify {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        Outcome::of(result)
    }
}

impl<T, E, F> Classifier<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

impl BreakerLayer {
    /// A layer whose services share `breaker`.
    pub fn new(breaker: CircuitBreaker) -> Self {
        BreakerLayer {
            breaker,
            classify: Classify,
        }
    }
}

impl<C> BreakerLayer<C> {
    /// The same layer, classifying results with `classify` (for instance: a response with status
    /// 503 is a failure).
    pub fn with_classifier<C2>(self, classify: C2) -> BreakerLayer<C2> {
        BreakerLayer {
            breaker: self.breaker,
            classify,
        }
    }

    /// The breaker of this layer.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for BreakerLayer<C> {
    type Service = BreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// A service guarded by a circuit breaker (made by [`BreakerLayer`]).
///
/// `poll_ready` is the inner service's; the breaker decides in `call`, so a rejected request
/// never reaches the inner service (and does not use the readiness it reserved: tower services
/// must tolerate a `call` that is never made after `poll_ready`).
#[derive(Debug, Clone)]
pub struct BreakerService<S, C = Classify> {
    inner: S,
    breaker: CircuitBreaker,
    classify: C,
}

impl<S, C> BreakerService<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The breaker guarding the service.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C, Req> Service<Req> for BreakerService<S, C>
where
    S: Service<Req>,
    C: Classifier<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire_owned() {
            Ok(permit) => ResponseFuture {
                state: State::Called {
                    future: self.inner.call(req),
                    permit: Some(permit),
                    classify: self.classify.clone(),
                },
            },
            Err(rejected) => ResponseFuture {
                state: State::Rejected {
                    rejected: Some(rejected),
                },
            },
        }
    }
}

pin_project! {
    /// The response future of [`BreakerService`].
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        // The permit is settled when the inner future completes, or given back if this future is
        // dropped first.
        Called { #[pin] future: F, permit: Option<OwnedPermit>, classify: C },
        Rejected { rejected: Option<crate::Rejected> },
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classifier<T, E>,
{
    type Output = Result<T, BreakerError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called {
                future,
                permit,
                classify,
            } => {
                let result = std::task::ready!(future.poll(cx));
                if let Some(p) = permit.take() {
                    p.settle(classify.classify(&result));
                }
                Poll::Ready(result.map_err(BreakerError::Inner))
            }
            StateProj::Rejected { rejected } => match rejected.take() {
                Some(r) => Poll::Ready(Err(BreakerError::Rejected(r))),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}
