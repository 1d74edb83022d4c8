//! The operator's one error type. Each variant says whether it is the user's to fix (reconcile
//! records a condition and waits for a change) or transient (requeue with backoff), and has a
//! stable, bounded metric label.

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
    /// An object could not be serialized for apply.
    #[error("serializing {what} failed: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The object misses metadata the API server always sets (name, uid, namespace).
    #[error("object is missing {0}")]
    MissingMetadata(&'static str),
    /// The spec cannot be served as written; the user has to change it.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The object does not deserialize into this operator's types (version skew).
    #[error("object does not match this operator's API version: {0}")]
    Undecodable(String),
}

impl Error {
    /// Bounded label for the `errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize { .. } => "serialize",
            Error::MissingMetadata(_) => "metadata",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Undecodable(_) => "undecodable",
        }
    }

    /// User errors wait for the object to change instead of being retried.
    pub fn is_user_error(&self) -> bool {
        matches!(self, Error::InvalidSpec(_) | Error::Undecodable(_))
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
