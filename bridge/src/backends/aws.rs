//! `kind = "aws"`: EC2 through aws-sdk-ec2, as a [`CloudApi`]. One client
//! per region, made on first use; the SDK's own retries are off, since a
//! capacity error must move to the next zone, not try the same one again.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_ec2::config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, Instance, InstanceStateName, InstanceType, ResourceType, ShutdownBehavior, Tag,
    TagSpecification,
};
use aws_sdk_ec2::Client;
use base64::Engine;
use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use super::cloud::api::{
    CloudApi, CloudError, CloudErrorKind, CloudFeatures, CloudInstance, CloudState, CreateSpec,
    MachineType, Placement,
};
use crate::config::CloudSection;

const CLOUD: &str = "aws";
/// Set on every instance: its display name in the console.
const NAME_TAG: &str = "Name";

pub struct AwsApi {
    profile: Option<String>,
    endpoint_url: Option<String>,
    /// Zone → subnet id.
    subnets: BTreeMap<String, String>,
    security_groups: Vec<String>,
    /// Loaded once, on first use (the credential chain is async).
    shared: OnceCell<aws_config::SdkConfig>,
    clients: Mutex<BTreeMap<String, Client>>,
}

impl AwsApi {
    pub fn new(section: &CloudSection) -> AwsApi {
        AwsApi {
            profile: section.profile.clone(),
            endpoint_url: section.endpoint_url.clone(),
            subnets: section.subnets.clone(),
            security_groups: section.security_group_ids.clone(),
            shared: OnceCell::new(),
            clients: Mutex::new(BTreeMap::new()),
        }
    }

    async fn client(&self, region: &str) -> Client {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(region)
        {
            return c.clone();
        }
        let shared = self
            .shared
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(p) = &self.profile {
                    loader = loader.profile_name(p);
                }
                loader.load().await
            })
            .await;
        let mut config = aws_sdk_ec2::config::Builder::from(shared)
            .region(Region::new(region.to_string()))
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled());
        if let Some(url) = &self.endpoint_url {
            config = config.endpoint_url(url);
        }
        let client = Client::from_conf(config.build());
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(region.to_string(), client.clone());
        client
    }

    /// Every instance DescribeInstances returns for `filters` (all pages).
    async fn describe_all(
        &self,
        region: &str,
        filters: Vec<Filter>,
        ids: Vec<String>,
    ) -> Result<Vec<CloudInstance>, CloudError> {
        let client = self.client(region).await;
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let answer = client
                .describe_instances()
                .set_filters((!filters.is_empty()).then(|| filters.clone()))
                .set_instance_ids((!ids.is_empty()).then(|| ids.clone()))
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| error("DescribeInstances", e))?;
            for reservation in answer.reservations() {
                for i in reservation.instances() {
                    out.extend(instance(region, i));
                }
            }
            match answer.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }
}

#[async_trait]
impl CloudApi for AwsApi {
    fn cloud(&self) -> &'static str {
        CLOUD
    }

    fn features(&self) -> CloudFeatures {
        CloudFeatures {
            stop_start: true,
            idempotent_create: true,
            user_data: true,
            tags: true,
        }
    }

    async fn zones(&self, region: &str) -> Result<Vec<String>, CloudError> {
        let answer = self
            .client(region)
            .await
            .describe_availability_zones()
            .send()
            .await
            .map_err(|e| error("DescribeAvailabilityZones", e))?;
        let mut zones: Vec<String> = answer
            .availability_zones()
            .iter()
            .filter(|z| z.state().is_none_or(|s| s.as_str() == "available"))
            .filter_map(|z| z.zone_name().map(str::to_string))
            .collect();
        zones.sort();
        Ok(zones)
    }

    async fn machine_types(
        &self,
        region: &str,
        _zone: &str,
    ) -> Result<Vec<MachineType>, CloudError> {
        let client = self.client(region).await;
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let answer = client
                .describe_instance_types()
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| error("DescribeInstanceTypes", e))?;
            for t in answer.instance_types() {
                let Some(name) = t.instance_type() else {
                    continue;
                };
                out.push(MachineType {
                    name: name.as_str().to_string(),
                    vcpus: t
                        .v_cpu_info()
                        .and_then(|v| v.default_v_cpus())
                        .map_or(0, |v| v.max(0) as u32),
                    ram_mib: t
                        .memory_info()
                        .and_then(|m| m.size_in_mib())
                        .map_or(0, |m| m.max(0) as u64),
                    // EC2 offers no nested virtualization: KVM needs the
                    // bare machine.
                    kvm: t.bare_metal().unwrap_or(false),
                    // EC2 has no TDX instances.
                    tdx: false,
                });
            }
            match answer.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn create(&self, spec: &CreateSpec) -> Result<CloudInstance, CloudError> {
        let mut tags = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in spec
            .tags
            .iter()
            .chain([(&NAME_TAG.to_string(), &spec.name)])
        {
            tags = tags.tags(Tag::builder().key(k).value(v).build());
        }
        let answer = self
            .client(&spec.placement.region)
            .await
            .run_instances()
            .image_id(&spec.image)
            .instance_type(InstanceType::from(spec.placement.machine_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&spec.token)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone(&spec.placement.zone)
                    .build(),
            )
            // The instance powers itself off once its grant ends: then it
            // is gone, not a stopped instance still holding its disk.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .set_subnet_id(self.subnets.get(&spec.placement.zone).cloned())
            .set_security_group_ids(
                (!self.security_groups.is_empty()).then(|| self.security_groups.clone()),
            )
            .tag_specifications(tags.build())
            .send()
            .await
            .map_err(|e| error("RunInstances", e))?;
        answer
            .instances()
            .first()
            .and_then(|i| instance(&spec.placement.region, i))
            .ok_or_else(|| CloudError {
                kind: CloudErrorKind::Transient,
                cloud: CLOUD,
                call: "RunInstances",
                code: "NoInstance".into(),
                message: "the answer named no instance".into(),
            })
    }

    async fn describe(
        &self,
        placement: &Placement,
        id: &str,
    ) -> Result<Option<CloudInstance>, CloudError> {
        match self
            .describe_all(&placement.region, Vec::new(), vec![id.to_string()])
            .await
        {
            Ok(found) => Ok(found.into_iter().next()),
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(
        &self,
        region: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudInstance>, CloudError> {
        let filters = tags
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        self.describe_all(region, filters, Vec::new()).await
    }

    async fn terminate(&self, instance: &CloudInstance) -> Result<(), CloudError> {
        match self
            .client(&instance.placement.region)
            .await
            .terminate_instances()
            .instance_ids(&instance.id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match error("TerminateInstances", e) {
                gone if gone.kind == CloudErrorKind::NotFound => Ok(()),
                e => Err(e),
            },
        }
    }
}

/// An EC2 instance as plain data; None without an id or a placement.
fn instance(region: &str, i: &Instance) -> Option<CloudInstance> {
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => CloudState::Pending,
        Some(InstanceStateName::Running) => CloudState::Running,
        Some(InstanceStateName::Stopping) => CloudState::Stopping,
        Some(InstanceStateName::Stopped) => CloudState::Stopped,
        Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
            CloudState::Terminated
        }
        // A state this SDK does not know: not serving, not gone either.
        _ => CloudState::Stopping,
    };
    let tags: BTreeMap<String, String> = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
        .collect();
    Some(CloudInstance {
        id: i.instance_id()?.to_string(),
        placement: Placement {
            region: region.to_string(),
            zone: i.placement()?.availability_zone()?.to_string(),
            machine_type: i.instance_type()?.as_str().to_string(),
        },
        state,
        public_ip: i.public_ip_address().and_then(|a| a.parse().ok()),
        private_ip: i.private_ip_address().and_then(|a| a.parse().ok()),
        tags,
        launched_at: i
            .launch_time()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())),
        state_reason: i
            .state_reason()
            .and_then(|r| r.message().or(r.code()))
            .map(str::to_string),
    })
}

/// Sorts an SDK failure by what the caller does next, keeping EC2's code.
fn error<E, R>(call: &'static str, e: SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (kind, code, message) = match &e {
        SdkError::ServiceError(_) => {
            let code = e.code().unwrap_or("Unknown").to_string();
            let message = e.message().unwrap_or_default().to_string();
            (kind_of(&code), code, message)
        }
        SdkError::ConstructionFailure(_) => (
            CloudErrorKind::Invalid,
            "ConstructionFailure".to_string(),
            crate::error_chain(&e),
        ),
        // The request may or may not have reached EC2.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => (
            CloudErrorKind::Transient,
            "NoAnswer".to_string(),
            crate::error_chain(&e),
        ),
        _ => (
            CloudErrorKind::Transient,
            "Unknown".to_string(),
            crate::error_chain(&e),
        ),
    };
    CloudError {
        kind,
        cloud: CLOUD,
        call,
        code,
        message,
    }
}

/// EC2's error codes, by what they call for.
fn kind_of(code: &str) -> CloudErrorKind {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacity"
        // The type is not offered in that zone: another zone may have it.
        | "Unsupported" => CloudErrorKind::Capacity,
        "VcpuLimitExceeded" | "InstanceLimitExceeded" | "MaxSpotInstanceCountExceeded" => {
            CloudErrorKind::Quota
        }
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "OptInRequired"
        | "Blocked" => CloudErrorKind::Auth,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => CloudErrorKind::Throttled,
        "InvalidInstanceID.NotFound" => CloudErrorKind::NotFound,
        "IdempotentParameterMismatch" => CloudErrorKind::Conflict,
        c if c.starts_with("InvalidAMIID")
            || c.starts_with("InvalidParameter")
            || c == "InvalidInstanceType"
            || c == "MissingParameter" =>
        {
            CloudErrorKind::Invalid
        }
        _ => CloudErrorKind::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_codes_sort_by_what_they_call_for() {
        assert_eq!(
            kind_of("InsufficientInstanceCapacity"),
            CloudErrorKind::Capacity
        );
        assert_eq!(kind_of("VcpuLimitExceeded"), CloudErrorKind::Quota);
        assert_eq!(kind_of("AuthFailure"), CloudErrorKind::Auth);
        assert_eq!(kind_of("RequestLimitExceeded"), CloudErrorKind::Throttled);
        assert_eq!(
            kind_of("InvalidInstanceID.NotFound"),
            CloudErrorKind::NotFound
        );
        assert_eq!(kind_of("InvalidAMIID.NotFound"), CloudErrorKind::Invalid);
        assert_eq!(kind_of("InternalError"), CloudErrorKind::Transient);
    }
}
