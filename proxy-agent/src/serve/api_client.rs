//! client-go's `rest_client_requests_total` and
//! `rest_client_request_duration_seconds` for the agent's Kubernetes
//! client: a tower layer around kube's service stack that records each
//! request's method, status and time to its response headers (a watch's
//! stream counts until it starts, as in client-go).
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, Response};

use super::Metrics;

/// Wraps a client's service in [`ApiRequestMetrics`].
#[derive(Clone, Debug)]
pub struct ApiRequestMetricsLayer {
    metrics: Arc<Metrics>,
    /// The API server's `host:port`, the series' `host` label.
    host: Arc<str>,
}

impl ApiRequestMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, host: &str) -> Self {
        Self {
            metrics,
            host: host.into(),
        }
    }
}

impl<S> tower::Layer<S> for ApiRequestMetricsLayer {
    type Service = ApiRequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiRequestMetrics {
            inner,
            metrics: self.metrics.clone(),
            host: self.host.clone(),
        }
    }
}

/// Records every request of the service it wraps into [`Metrics`].
#[derive(Clone, Debug)]
pub struct ApiRequestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    host: Arc<str>,
}

impl<S, B, R> tower::Service<Request<B>> for ApiRequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => response.status().as_str().to_string(),
                Err(_) => "<error>".to_string(),
            };
            metrics.observe_api_request(&method, &host, &code, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    /// A request through the layer is counted by code, host and method,
    /// and timed by verb and host; a failed one counts as "<error>".
    #[tokio::test]
    async fn requests_are_counted_and_timed() {
        let metrics = Arc::new(Metrics::new());
        let layer = ApiRequestMetricsLayer::new(metrics.clone(), "10.96.0.1:443");
        let answer = |request: Request<()>| async move {
            if request.uri().path() == "/fail" {
                return Err("connection refused");
            }
            Ok::<_, &str>(
                Response::builder()
                    .status(if request.method() == http::Method::GET {
                        200
                    } else {
                        404
                    })
                    .body(())
                    .expect("a response"),
            )
        };
        let mut service = layer.layer(tower::service_fn(answer));
        for (method, path) in [
            ("GET", "/api"),
            ("GET", "/api"),
            ("POST", "/x"),
            ("GET", "/fail"),
        ] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("a request");
            let _ = service.ready().await.expect("ready").call(request).await;
        }
        let text = metrics.render();
        for line in [
            "rest_client_requests_total{code=\"200\",host=\"10.96.0.1:443\",method=\"GET\"} 2\n",
            "rest_client_requests_total{code=\"404\",host=\"10.96.0.1:443\",method=\"POST\"} 1\n",
            "rest_client_requests_total{code=\"<error>\",host=\"10.96.0.1:443\",method=\"GET\"} 1\n",
            "rest_client_request_duration_seconds_count{host=\"10.96.0.1:443\",verb=\"GET\"} 3\n",
            "rest_client_request_duration_seconds_bucket{host=\"10.96.0.1:443\",verb=\"POST\",le=\"+Inf\"} 1\n",
            "# TYPE rest_client_request_duration_seconds histogram\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
