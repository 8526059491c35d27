//! Errors of the core runtime, and the one mapping from error kinds to gRPC
//! codes and HTTP statuses that every service uses.

use crate::config::ConfigError;

/// Result alias for the core runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors raised by the core runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("discovery: {0}")]
    Discovery(String),
    #[error("telemetry: {0}")]
    Telemetry(String),
    #[error("serve {what}: {message}")]
    Serve { what: &'static str, message: String },
}

impl Error {
    /// The kind of failure, for mapping to a status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::InvalidArgument,
            Error::Bind { .. } | Error::Serve { .. } | Error::Telemetry(_) => ErrorKind::Internal,
            Error::Discovery(_) => ErrorKind::Unavailable,
        }
    }
}

/// The small fixed set of failure kinds lmgrid reports to callers.
///
/// Every service error maps to one of these, and each maps to exactly one gRPC
/// code and one HTTP status, so clients see the same failure the same way on
/// every API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed: a bad field, shape, datatype or value.
    InvalidArgument,
    /// The model, version, job or other named thing does not exist.
    NotFound,
    /// Creating something that already exists.
    AlreadyExists,
    /// No or unknown credentials.
    Unauthenticated,
    /// Credentials are valid but not for this resource.
    PermissionDenied,
    /// A limit or a bounded queue is full; retry later.
    ResourceExhausted,
    /// The system is not in a state to do this (e.g. model still loading).
    FailedPrecondition,
    /// Nobody can serve this right now; safe to retry elsewhere.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// The caller went away or cancelled.
    Cancelled,
    /// The operation is not implemented (yet).
    Unimplemented,
    /// Stored or transferred bytes do not match their digest.
    DataLoss,
    /// A bug or an unexpected failure inside lmgrid.
    Internal,
}

impl ErrorKind {
    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::DataLoss => Code::DataLoss,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The HTTP status for this kind.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists => StatusCode::CONFLICT,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // 499 "client closed request", as nginx and Envoy report it.
            ErrorKind::Cancelled => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::REQUEST_TIMEOUT)
            }
            ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::DataLoss | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The kind an upstream gRPC status stands for, so that a proxy reports
    /// what its upstream reported.
    pub fn from_grpc_code(code: tonic::Code) -> ErrorKind {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists | Code::Aborted => ErrorKind::AlreadyExists,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::Unimplemented => ErrorKind::Unimplemented,
            Code::DataLoss => ErrorKind::DataLoss,
            Code::Ok | Code::Unknown | Code::Internal => ErrorKind::Internal,
        }
    }

    /// A short machine-readable name, used in JSON error bodies and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::DataLoss => "data_loss",
            ErrorKind::Internal => "internal",
        }
    }

    /// A gRPC status of this kind with a message.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), message)
    }
}

/// The status an RPC answers while its behaviour is still to be built: an
/// honest `UNIMPLEMENTED` that names the RPC and what brings it.
pub fn not_yet_implemented(rpc: &str, arrives_with: &str) -> tonic::Status {
    ErrorKind::Unimplemented.status(format!(
        "{rpc} is not implemented yet: it arrives with {arrives_with}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 13] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
        ErrorKind::FailedPrecondition,
        ErrorKind::Unavailable,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Cancelled,
        ErrorKind::Unimplemented,
        ErrorKind::DataLoss,
        ErrorKind::Internal,
    ];

    #[test]
    fn every_kind_round_trips_through_its_grpc_code() {
        for kind in ALL {
            assert_eq!(
                ErrorKind::from_grpc_code(kind.grpc_code()),
                kind,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn http_statuses_are_the_documented_ones() {
        assert_eq!(ErrorKind::InvalidArgument.http_status(), 400);
        assert_eq!(ErrorKind::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorKind::PermissionDenied.http_status(), 403);
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::ResourceExhausted.http_status(), 429);
        assert_eq!(ErrorKind::Cancelled.http_status(), 499);
        assert_eq!(ErrorKind::Unimplemented.http_status(), 501);
        assert_eq!(ErrorKind::Unavailable.http_status(), 503);
        assert_eq!(ErrorKind::DeadlineExceeded.http_status(), 504);
        for kind in ALL {
            assert!(kind.http_status().is_client_error() || kind.http_status().is_server_error());
        }
    }

    #[test]
    fn not_yet_implemented_names_the_rpc() {
        let status = not_yet_implemented("ModelInfer", "the worker issue");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("ModelInfer"));
    }
}
