//! [`ServiceObject`]: a Service as the model keeps it.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use super::{
    Identity, Rejection, ServiceName,
    validate::{ServiceCheck, check_service, service_name_of},
};

/// A Service reduced to what proxying reads: its identity and its checked
/// plan (addresses, ports, policies, affinity).
///
/// Sources keep this rather than the API object, whose spec type alone is
/// about a kilobyte; the model checked every object once more anyway.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceObject {
    pub identity: Identity,
    /// The namespace/name it is known by (namespace defaulted).
    pub(super) name: ServiceName,
    pub(super) check: ServiceCheck,
    /// `metadata.creationTimestamp`: of two Services claiming one frontend,
    /// the older keeps it.
    pub(super) created: Option<jiff::Timestamp>,
}

impl ServiceObject {
    pub fn new(object: &Service) -> Self {
        ServiceObject {
            identity: Identity::of(&object.metadata),
            name: service_name_of(object),
            check: check_service(object),
            created: object.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    /// `metadata.creationTimestamp`, if it has one.
    pub fn created(&self) -> Option<jiff::Timestamp> {
        self.created
    }

    /// The object with `at` for creation time, for an object that has
    /// none (a manifest file's): when its source first saw it, so that a
    /// Service added later never takes an address from one that was there.
    pub fn first_seen_at(&self, at: jiff::Timestamp) -> ServiceObject {
        ServiceObject {
            created: self.created.or(Some(at)),
            ..self.clone()
        }
    }

    /// What is wrong with the object; empty when it is valid.
    pub fn rejections(&self) -> &[Rejection] {
        &self.check.rejections
    }

    /// The valid cluster IPs it is proxied on (empty when it is not
    /// proxied).
    pub fn cluster_ips(&self) -> &[IpAddr] {
        self.check
            .plan
            .as_ref()
            .map_or(&[], |plan| &plan.cluster_ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::simple_service;

    #[test]
    fn keeps_identity_and_the_check_only() {
        let mut object = simple_service("ns", "web", "10.0.0.300", 80);
        object.metadata.uid = Some("u-1".into());
        object.metadata.resource_version = Some("7".into());
        object.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
        let kept = ServiceObject::new(&object);
        assert_eq!(kept.identity.uid.as_deref(), Some("u-1"));
        assert_eq!(kept.identity.resource_version.as_deref(), Some("7"));
        assert_eq!(kept.name.to_string(), "ns/web");
        assert_eq!(kept.rejections(), check_service(&object).rejections);
        assert_eq!(kept.rejections().len(), 1, "the cluster IP");
    }
}
