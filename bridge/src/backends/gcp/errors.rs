//! GCE's failures sorted into [`CloudErrorKind`]: a failed HTTP call
//! (by its canonical status, then its HTTP code) and an error inside a
//! DONE zone operation (by its `errors[].code`).

use google_cloud_compute_v1::model::Operation;
use google_cloud_gax::error::rpc::{Code, StatusDetails};
use google_cloud_gax::error::Error;

use crate::backends::cloud::api::{CloudError, CloudErrorKind};

const CLOUD: &str = "gcp";

/// An error kiln made up (a bad tag, a timeout), not one GCE sent.
pub(crate) fn own(
    kind: CloudErrorKind,
    call: &'static str,
    code: &str,
    message: String,
) -> CloudError {
    CloudError {
        kind,
        cloud: CLOUD,
        call,
        code: code.to_string(),
        message,
    }
}

/// The kind of an HTTP status.
fn by_http(code: u16) -> CloudErrorKind {
    match code {
        400 | 412 => CloudErrorKind::Invalid,
        401 | 403 => CloudErrorKind::Auth,
        404 => CloudErrorKind::NotFound,
        409 => CloudErrorKind::Conflict,
        429 => CloudErrorKind::Throttled,
        _ => CloudErrorKind::Transient,
    }
}

/// Whether a refusal is a rate limit or a quota, which Compute sends as
/// 403s: by the ErrorInfo reason when there is one, else by Compute's
/// message wording (`Rate Limit Exceeded`, `Quota 'CPUS' exceeded`).
fn limit_kind(message: &str, details: &[StatusDetails]) -> Option<CloudErrorKind> {
    let reason = details.iter().find_map(|d| match d {
        StatusDetails::ErrorInfo(i) => Some(i.reason.to_ascii_uppercase()),
        _ => None,
    });
    let m = message.to_ascii_lowercase();
    match reason.as_deref() {
        Some(r) if r.contains("RATE_LIMIT") => Some(CloudErrorKind::Throttled),
        Some(r) if r.contains("QUOTA") => Some(CloudErrorKind::Quota),
        _ if m.contains("rate limit") => Some(CloudErrorKind::Throttled),
        _ if m.starts_with("quota '") || m.contains("quota exceeded") => {
            Some(CloudErrorKind::Quota)
        }
        _ => None,
    }
}

/// A failed call, sorted. Service errors go by their canonical code;
/// errors without one (a proxy's bare 502) by HTTP status; a request
/// that never got an answer is transient; one the client could not even
/// build or read is invalid (retrying it cannot help).
pub(crate) fn call(call: &'static str, e: &Error) -> CloudError {
    let (kind, code, message) = if let Some(s) = e.status() {
        let kind = match s.code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                CloudErrorKind::Invalid
            }
            Code::Unauthenticated => CloudErrorKind::Auth,
            Code::PermissionDenied => {
                limit_kind(&s.message, &s.details).unwrap_or(CloudErrorKind::Auth)
            }
            Code::ResourceExhausted => {
                limit_kind(&s.message, &s.details).unwrap_or(CloudErrorKind::Throttled)
            }
            Code::NotFound => CloudErrorKind::NotFound,
            Code::AlreadyExists | Code::Aborted => CloudErrorKind::Conflict,
            Code::Unavailable | Code::Internal | Code::DeadlineExceeded | Code::Unknown => {
                match e.http_status_code() {
                    Some(h) if (400..500).contains(&h) => by_http(h),
                    _ => CloudErrorKind::Transient,
                }
            }
            _ => e
                .http_status_code()
                .map_or(CloudErrorKind::Transient, by_http),
        };
        (kind, s.code.name().to_string(), s.message.clone())
    } else if let Some(h) = e.http_status_code() {
        (by_http(h), h.to_string(), e.to_string())
    } else if e.is_authentication() {
        (CloudErrorKind::Auth, "credentials".into(), e.to_string())
    } else if e.is_binding() || e.is_serialization() || e.is_deserialization() {
        (CloudErrorKind::Invalid, "client".into(), e.to_string())
    } else {
        // Timeouts, refused or dropped connections.
        (CloudErrorKind::Transient, "transport".into(), e.to_string())
    };
    CloudError {
        kind,
        cloud: CLOUD,
        call,
        code,
        message,
    }
}

/// The error inside a DONE operation, if it has one. Its first error's
/// code decides: no capacity in the zone, a quota, a name taken
/// meanwhile; else the operation's HTTP status. A missing resource in an
/// insert is the request's (an image, a network): invalid.
pub(crate) fn operation(call: &'static str, op: &Operation) -> Option<CloudError> {
    let first = op.error.as_ref()?.errors.first()?;
    let code = first.code.clone().unwrap_or_default();
    let kind = match code.as_str() {
        "ZONE_RESOURCE_POOL_EXHAUSTED" | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS" => {
            CloudErrorKind::Capacity
        }
        "QUOTA_EXCEEDED" => CloudErrorKind::Quota,
        "RESOURCE_ALREADY_EXISTS" | "ALREADY_EXISTS" => CloudErrorKind::Conflict,
        "RATE_LIMIT_EXCEEDED" => CloudErrorKind::Throttled,
        _ => match op
            .http_error_status_code
            .and_then(|c| u16::try_from(c).ok())
        {
            // Deleting what is gone: the instance is not found.
            Some(404) if call == "delete" => CloudErrorKind::NotFound,
            Some(404) => CloudErrorKind::Invalid,
            Some(h) => by_http(h),
            None => CloudErrorKind::Transient,
        },
    };
    Some(CloudError {
        kind,
        cloud: CLOUD,
        call,
        code,
        message: first.message.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_compute_v1::model::operation;
    use google_cloud_gax::error::rpc::Status;

    fn op(code: &str, http: i32) -> Operation {
        Operation::new()
            .set_error(
                operation::Error::new().set_errors([operation::error::Errors::new()
                    .set_code(code)
                    .set_message("m")]),
            )
            .set_http_error_status_code(http)
    }

    #[test]
    fn operation_errors_sort_by_code() {
        let kind = |code, http| operation("insert", &op(code, http)).unwrap().kind;
        assert_eq!(
            kind("ZONE_RESOURCE_POOL_EXHAUSTED", 503),
            CloudErrorKind::Capacity
        );
        assert_eq!(
            kind("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", 503),
            CloudErrorKind::Capacity
        );
        assert_eq!(kind("QUOTA_EXCEEDED", 403), CloudErrorKind::Quota);
        assert_eq!(kind("RESOURCE_NOT_FOUND", 404), CloudErrorKind::Invalid);
        assert_eq!(kind("PERMISSIONS_ERROR", 403), CloudErrorKind::Auth);
        assert_eq!(kind("INTERNAL_ERROR", 500), CloudErrorKind::Transient);
        assert!(operation("insert", &Operation::new()).is_none());
        let e = operation("insert", &op("QUOTA_EXCEEDED", 403)).unwrap();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("QUOTA_EXCEEDED", "m")
        );
    }

    #[test]
    fn service_errors_sort_by_status() {
        let kind = |code: Code, msg: &str| {
            let s = Status::default().set_code(code).set_message(msg);
            call("get", &Error::service(s)).kind
        };
        assert_eq!(kind(Code::NotFound, "x"), CloudErrorKind::NotFound);
        assert_eq!(kind(Code::AlreadyExists, "x"), CloudErrorKind::Conflict);
        assert_eq!(
            kind(Code::PermissionDenied, "Required permission"),
            CloudErrorKind::Auth
        );
        assert_eq!(
            kind(Code::PermissionDenied, "Rate Limit Exceeded"),
            CloudErrorKind::Throttled
        );
        assert_eq!(
            kind(
                Code::PermissionDenied,
                "Quota 'CPUS' exceeded.  Limit: 24.0"
            ),
            CloudErrorKind::Quota
        );
        assert_eq!(kind(Code::Unauthenticated, "x"), CloudErrorKind::Auth);
        assert_eq!(
            kind(Code::ResourceExhausted, "x"),
            CloudErrorKind::Throttled
        );
        assert_eq!(kind(Code::InvalidArgument, "x"), CloudErrorKind::Invalid);
        assert_eq!(kind(Code::Unavailable, "x"), CloudErrorKind::Transient);
        assert_eq!(kind(Code::Internal, "x"), CloudErrorKind::Transient);
    }

    #[test]
    fn bare_http_and_transport_errors() {
        let http = |code| {
            call(
                "get",
                &Error::http(code, Default::default(), Default::default()),
            )
            .kind
        };
        assert_eq!(http(502), CloudErrorKind::Transient);
        assert_eq!(http(429), CloudErrorKind::Throttled);
        assert_eq!(http(403), CloudErrorKind::Auth);
        assert_eq!(
            call("get", &Error::io("reset")).kind,
            CloudErrorKind::Transient
        );
        assert_eq!(
            call("get", &Error::timeout("slow")).kind,
            CloudErrorKind::Transient
        );
    }
}
