//! Turning the AWS SDK's errors into leaselock's.

use std::fmt;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use leaselock::Error;

pub(crate) const NAME: &str = "dynamodb";

/// A failed DynamoDB request: which operation on which table, and the SDK's error as the source.
/// Request signing happens inside the SDK and its errors never carry credentials; the message
/// names only the operation, the table, the error code and the service's message.
#[derive(Debug)]
pub(crate) struct RequestError {
    operation: &'static str,
    table: String,
    detail: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on table `{}` failed: {}",
            self.operation, self.table, self.detail
        )
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A failure of the backend's own making (an item it cannot read, a table shaped differently).
pub(crate) fn invalid_data(table: &str, detail: impl Into<String>) -> Error {
    Error::permanent(
        NAME,
        RequestError {
            operation: "reading an item",
            table: table.to_owned(),
            detail: detail.into(),
            source: None,
        },
    )
}

/// Classifies an SDK error:
/// - a missing table means storage is not initialized;
/// - refused credentials or permissions are [`Error::Denied`] (permanent);
/// - an endpoint that cannot be reached means storage is not accessible (retryable);
/// - throttling, timeouts, server-side failures and broken responses are retryable;
/// - everything else (validation errors, a malformed request) is permanent.
pub(crate) fn convert<E, R>(operation: &'static str, table: &str, error: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let code = error.code().map(str::to_owned);
    let message = error.message().map(str::to_owned);
    let detail = match (&code, &message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        _ => DisplayErrorContext(&error).to_string(),
    };
    let kind = match &error {
        SdkError::ConstructionFailure(_) => Kind::Permanent,
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Kind::Transient,
        // Connection refused, DNS, TLS: the endpoint cannot be reached (retryable).
        SdkError::DispatchFailure(_) => Kind::Unreachable,
        SdkError::ServiceError(_) => classify_code(code.as_deref().unwrap_or_default()),
        _ => Kind::Transient,
    };
    let table = table.to_owned();
    let wrapped = |detail: String, error: SdkError<E, R>| RequestError {
        operation,
        table: table.clone(),
        detail,
        source: Some(Box::new(error)),
    };
    match kind {
        Kind::Missing => Error::NotInitialized {
            backend: NAME,
            what: format!(
                "table `{table}` does not exist ({detail}): run init_storage (or `leaselock init`)"
            ),
        },
        Kind::Denied => Error::denied(
            NAME,
            format!(
                "{operation} on table `{table}` was refused: {detail} (check the credentials \
                 and the IAM permissions for this table)"
            ),
            Some(Box::new(wrapped(detail.clone(), error))),
        ),
        Kind::Unreachable => Error::NotAccessible {
            backend: NAME,
            what: format!("cannot reach DynamoDB for {operation} on table `{table}`: {detail}"),
            source: Some(Box::new(wrapped(detail.clone(), error))),
        },
        Kind::Transient => Error::transient(NAME, wrapped(detail, error)),
        Kind::Permanent => Error::permanent(NAME, wrapped(detail, error)),
    }
}

enum Kind {
    Missing,
    Denied,
    Unreachable,
    Transient,
    Permanent,
}

fn classify_code(code: &str) -> Kind {
    match code {
        "ResourceNotFoundException" => Kind::Missing,
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "IncompleteSignature"
        | "IncompleteSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "NotAuthorized"
        | "SignatureDoesNotMatch" => Kind::Denied,
        "ProvisionedThroughputExceededException"
        | "RequestLimitExceeded"
        | "ThrottlingException"
        | "Throttling"
        | "InternalServerError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "TransactionConflictException"
        | "LimitExceededException"
        | "ResourceInUseException"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "PriorRequestNotComplete" => Kind::Transient,
        _ => Kind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert!(matches!(
            classify_code("ResourceNotFoundException"),
            Kind::Missing
        ));
        assert!(matches!(
            classify_code("AccessDeniedException"),
            Kind::Denied
        ));
        assert!(matches!(
            classify_code("ThrottlingException"),
            Kind::Transient
        ));
        assert!(matches!(
            classify_code("ValidationException"),
            Kind::Permanent
        ));
    }
}
