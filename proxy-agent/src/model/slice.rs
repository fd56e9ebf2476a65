//! [`Slice`]: an EndpointSlice as the model keeps it.
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Identity, Rejection,
    validate::{SliceCheck, check_endpoint_slice},
};

/// The annotation the EndpointSlice controller sets to the time of the
/// change that the slice's current version reflects (kube-proxy's network
/// programming latency starts there).
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// An EndpointSlice reduced to what proxying reads: its identity, the time
/// of its last change, and its ports and endpoints, already checked.
///
/// Sources keep this rather than the API object: the object's endpoint
/// type alone is about 350 bytes before any of its strings, so at tens of
/// thousands of slices the objects were most of the agent's memory, and
/// the model parsed them once more anyway.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub identity: Identity,
    /// The [`LAST_CHANGE_TRIGGER_TIME`] annotation.
    pub trigger_time: Option<String>,
    pub(super) check: SliceCheck,
}

impl Slice {
    pub fn new(object: &EndpointSlice) -> Self {
        let meta = &object.metadata;
        Slice {
            identity: Identity::of(meta),
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
                .cloned(),
            check: check_endpoint_slice(object),
        }
    }

    /// What is wrong with the object; empty when it is valid.
    pub fn rejections(&self) -> &[Rejection] {
        &self.check.rejections
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::test_support::simple_slice;

    #[test]
    fn keeps_identity_trigger_time_and_the_check_only() {
        let mut object = simple_slice("ns", "web-1", "web", 8080, &["10.1.0.1", "x"]);
        object.metadata.uid = Some("u-1".into());
        object.metadata.resource_version = Some("7".into());
        object.metadata.annotations = Some(BTreeMap::from([
            (
                LAST_CHANGE_TRIGGER_TIME.to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            ),
            ("other".to_owned(), "dropped".to_owned()),
        ]));
        let slice = Slice::new(&object);
        assert_eq!(slice.identity.name.as_deref(), Some("web-1"));
        assert_eq!(slice.identity.uid.as_deref(), Some("u-1"));
        assert_eq!(slice.identity.resource_version.as_deref(), Some("7"));
        assert_eq!(slice.trigger_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(slice.rejections(), check_endpoint_slice(&object).rejections);
        assert_eq!(slice.rejections().len(), 1, "the address \"x\"");
    }
}
