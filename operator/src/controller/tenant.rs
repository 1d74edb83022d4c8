//! TenantTimePolicy reconcile: plan from the index, apply the Service, EndpointSlices and
//! `time-config` in the tenant's namespace, write status when it changed. A tenant the index
//! does not hold as it is yet waits for the watch feed, which triggers it once it does.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Patch;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use stratum_api::TenantTimePolicy;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{Context, RESYNC, apply_namespaced, apply_params, delete_child, lock};
use crate::build::audit;
use crate::build::status::{TenantObservation, tenant_status};
use crate::error::{Error, Result};

/// Controller name in metrics.
pub const CONTROLLER: &str = "tenant";

/// Reconciles one TenantTimePolicy.
pub async fn reconcile(
    obj: Arc<DeserializeGuard<TenantTimePolicy>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.measure(CONTROLLER);
    let tenant = match &obj.0 {
        Ok(t) => t,
        Err(invalid) => return Err(Error::Undecodable(invalid.error.clone())),
    };
    let ns = tenant
        .namespace()
        .ok_or(Error::MissingMetadata("TenantTimePolicy namespace"))?;
    let name = tenant.name_any();
    let plan = {
        let mut planner = lock(&ctx.planner);
        let index = lock(&ctx.index);
        // Its port, owners and peers come from the index: planned before the index has this
        // version, it would be refused for a port it has not been given yet.
        if !index.holds_tenant(tenant) {
            tracing::debug!(tenant = %format!("{ns}/{name}"), "not indexed yet; the feed triggers it");
            return Ok(Action::await_change());
        }
        planner.plan_tenant(&index, tenant)?
    };
    let mut seen = TenantObservation {
        time_service: plan.time_service.clone(),
        port: plan.port,
        ready_endpoints: plan.ready_endpoints,
        allow_list_size: plan.allow_list_size,
        service_ips: Vec::new(),
        conflict: plan.conflict.as_ref().map(ToString::to_string),
        nts: tenant.spec.nts().map(|_| {
            let key = (ns.clone(), name.clone());
            plan.time_service.as_ref().and_then(|ts| {
                lock(&ctx.nts_outcomes)
                    .get(ts)
                    .and_then(|outcomes| outcomes.get(&key).cloned())
            })
        }),
        symmetric_keys: tenant.spec.symmetric_keys().map(|_| {
            let key = (ns.clone(), name.clone());
            plan.time_service.as_ref().and_then(|ts| {
                lock(&ctx.key_outcomes)
                    .get(ts)
                    .and_then(|outcomes| outcomes.get(&key).cloned())
            })
        }),
    };
    if plan.refused.is_none() {
        if let Some(service) = &plan.service {
            let applied = apply_namespaced(&ctx.client, service).await?;
            seen.service_ips = applied.spec.and_then(|s| s.cluster_ips).unwrap_or_default();
        }
        for slice in &plan.slices {
            apply_namespaced(&ctx.client, slice).await?;
        }
        if let Some(time_config) = &plan.time_config {
            let id = crate::names::tenant_id(&ns, &name);
            let before = timezone_baseline(&ctx, &id, time_config).await?;
            apply_namespaced(&ctx.client, time_config).await?;
            let after = time_config.data.as_ref().and_then(|d| d.get("TZ")).cloned();
            if let Some(change) =
                audit::timezone_change(&id, before.as_ref().map(Option::as_deref), after.as_deref())
            {
                tracing::info!(tenant = %id, note = %change.note(), "time zone changed");
                ctx.event(
                    &tenant.object_ref(&()),
                    EventType::Normal,
                    change.reason(),
                    change.note(),
                )
                .await;
            }
            lock(&ctx.last_timezone).insert(id, after);
        }
    }
    if plan.refused.is_some() || plan.time_config.is_none() {
        lock(&ctx.last_timezone).remove(&crate::names::tenant_id(&ns, &name));
    }
    // After the apply: what this tenant had and its plan no longer has (a refusal, a lost
    // TimeService, a renamed Service) goes, so nothing routes to a port that is not its own.
    for child in &plan.prune {
        delete_child(&ctx.client, child).await?;
    }
    let now = Time(Timestamp::now());
    let status = tenant_status(
        tenant.status.as_ref(),
        tenant.metadata.generation,
        plan.refused.clone(),
        seen,
        &now,
    );
    if tenant.status.as_ref() != Some(&status) {
        let was_refused = tenant.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "False")
        });
        if let Some((reason, message)) = &plan.refused
            && !was_refused
        {
            ctx.event(
                &tenant.object_ref(&()),
                EventType::Warning,
                reason,
                message.clone(),
            )
            .await;
        }
        let was_conflict = tenant.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Conflict" && c.status == "True")
        });
        if let Some(object) = &plan.conflict
            && !was_conflict
            && plan.refused.is_none()
        {
            ctx.event(
                &tenant.object_ref(&()),
                EventType::Warning,
                "Conflict",
                format!("{object} exists and was not created by Stratum; it is left alone"),
            )
            .await;
        }
        let body = serde_json::json!({
            "apiVersion": TenantTimePolicy::api_version(&()),
            "kind": TenantTimePolicy::kind(&()),
            "status": status,
        });
        Api::<TenantTimePolicy>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &apply_params(), &Patch::Apply(&body))
            .await?;
    }
    ctx.succeeded(&format!("{ns}/{name}"));
    Ok(if plan.refused.is_some() {
        Action::await_change()
    } else {
        Action::requeue(RESYNC)
    })
}

/// The `TZ` the tenant's `time-config` had before this pass: the last one applied, or on the
/// first pass since start the one in the cluster (`None`: no `time-config` yet).
async fn timezone_baseline(
    ctx: &Context,
    id: &str,
    time_config: &ConfigMap,
) -> Result<Option<Option<String>>> {
    if let Some(known) = lock(&ctx.last_timezone).get(id) {
        return Ok(Some(known.clone()));
    }
    let ns = time_config
        .metadata
        .namespace
        .as_deref()
        .unwrap_or_default();
    let name = time_config.metadata.name.as_deref().unwrap_or_default();
    let current = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?;
    Ok(current.map(|cm| cm.data.and_then(|mut d| d.remove("TZ"))))
}

/// Error policy: user errors wait for a change; transient ones back off.
pub fn error_policy(
    obj: Arc<DeserializeGuard<TenantTimePolicy>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failed(CONTROLLER, error);
    let key = match &obj.0 {
        Ok(t) => format!("{}/{}", t.namespace().unwrap_or_default(), t.name_any()),
        Err(invalid) => format!(
            "{}/{}",
            invalid.metadata.namespace.clone().unwrap_or_default(),
            invalid.metadata.name.clone().unwrap_or_default()
        ),
    };
    tracing::warn!(tenant = %key, error = %error, "reconcile failed");
    ctx.error_action(&key, error)
}
