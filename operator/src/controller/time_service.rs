//! TimeService reconcile: draft a plan from the index, build it outside the index lock
//! (`plan`), apply agent children with server-side apply, write the agent config (coalesced,
//! audited), write status when it changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, Preconditions};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use stratum_api::{AgentConfig, TimeService};

use super::{Context, RESYNC, apply_cluster, apply_namespaced, apply_params, lock};
use crate::build::audit;
use crate::build::nts_material::{
    COOKIE_KEY_LEN, CertificateProblem, KeysProblem, NtsTenant, ROTATE_REQUEST_ANNOTATION,
    ROTATION_REQUEST_SPACING, TenantMaterial, build_nts_secret, check_certificate,
    check_symmetric_keys, check_upstream_keys, plan_cookie_keys,
};
use crate::build::status::{
    Blocked, DaemonSetCounts, add_upstream_keys_condition, time_service_status,
};
use crate::coalesce::Decision;
use crate::error::{Error, Result};
use crate::names;
use crate::owned::is_stratums;

/// Controller name in metrics.
pub const CONTROLLER: &str = "timeservice";

/// Reconciles one TimeService.
pub async fn reconcile(
    obj: Arc<DeserializeGuard<TimeService>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.measure(CONTROLLER);
    let ts = match &obj.0 {
        Ok(ts) => ts,
        Err(invalid) => return Err(Error::Undecodable(invalid.error.clone())),
    };
    let name = ts.name_any();
    let mut draft = {
        let mut planner = lock(&ctx.planner);
        let index = lock(&ctx.index);
        ctx.metrics
            .tenants
            .set(i64::try_from(index.tenants().len()).unwrap_or(i64::MAX));
        // Planned as handed over, which may be newer than the index's copy; the watch feed
        // indexes it and triggers again.
        planner.draft_time_service(&index, ts)
    };
    // Serializing and gzipping the agent config holds neither lock: the feed goes on indexing
    // and the tenant controller on planning meanwhile.
    let plan = draft.build(ts, &ctx.settings)?;
    let shed_changed = lock(&ctx.planner).keep(draft);
    if !shed_changed.is_empty()
        && let Some(senders) = ctx.triggers.get()
    {
        senders.send(shed_changed);
    }
    let cidrs: usize = plan.allow_list_sizes.iter().sum();
    ctx.metrics
        .allow_list_size
        .set(i64::try_from(cidrs).unwrap_or(i64::MAX));
    let client = &ctx.client;
    apply_namespaced(client, &plan.rbac.service_account).await?;
    apply_namespaced(client, &plan.rbac.role).await?;
    apply_namespaced(client, &plan.rbac.role_binding).await?;
    apply_cluster(client, &plan.rbac.cluster_role_binding).await?;

    // The config, the DaemonSet and status do not wait for each other's failures: a failed
    // write is retried after status is written, and the NetworkPolicies (tenants' rules, the
    // largest child) come last, so they can never hold back the agents or the status.
    let mut requeue = RESYNC;
    let mut failed: Option<Error> = None;
    // The key material first: the config names its files, and agents wait for files that
    // are not there yet rather than for a config.
    if plan.config.is_some() && plan.daemonset.is_some() {
        match write_nts_material(&ctx, ts, &plan.nts_tenants).await {
            Ok(wait) => requeue = requeue.min(wait),
            Err(e) => failed = Some(e),
        }
    }
    if let (Some(config), Some(config_map)) = (&plan.config, &plan.config_map) {
        match write_config(&ctx, ts, config, config_map, &plan.tenants).await {
            Ok(Some(wait)) => requeue = requeue.min(wait),
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }

    let daemonset = match &plan.daemonset {
        Some(ds) => {
            let applied = apply_namespaced(client, ds).await?;
            Some(counts(&applied))
        }
        None => {
            delete_daemonset(&ctx, &name).await?;
            None
        }
    };
    if let Err(e) = apply_network_policies(&ctx, &name, &plan.network_policies).await {
        failed = failed.or(Some(e));
    }

    let now = Time(Timestamp::now());
    let clocks: Vec<_> = plan.clocks.iter().collect();
    let mut status = time_service_status(
        ts.status.as_ref(),
        ts.metadata.generation,
        plan.blocked.as_ref(),
        daemonset,
        &clocks,
        &plan.uncovered,
        &now,
    );
    add_upstream_keys_condition(
        &mut status,
        ts.status.as_ref(),
        lock(&ctx.upstream_key_outcomes).get(&name),
        ts.metadata.generation,
        &now,
    );
    observe_propagation(&ctx, &name, &plan.clocks, status.nodes.desired);
    observe_off_designated(&ctx, ts, &plan.off_designated).await;
    if ts.status.as_ref() != Some(&status) {
        announce_transitions(&ctx, ts, ts.status.as_ref(), &plan.blocked).await;
        let body = serde_json::json!({
            "apiVersion": TimeService::api_version(&()),
            "kind": TimeService::kind(&()),
            "status": status,
        });
        Api::<TimeService>::all(client.clone())
            .patch_status(&name, &apply_params(), &Patch::Apply(&body))
            .await?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    ctx.succeeded(&name);
    Ok(Action::requeue(requeue))
}

/// Applies the TimeService's NetworkPolicies and deletes the further ones (`-tenants-<n>`)
/// this process applied before and the plan no longer has.
async fn apply_network_policies(
    ctx: &Context,
    name: &str,
    policies: &[k8s_openapi::api::networking::v1::NetworkPolicy],
) -> Result<()> {
    for policy in policies {
        apply_namespaced(&ctx.client, policy).await?;
    }
    let before = lock(&ctx.network_policies)
        .insert(name.to_owned(), policies.len())
        .unwrap_or(0);
    let api = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
        ctx.client.clone(),
        &ctx.settings.namespace,
    );
    for n in policies.len().max(1)..before {
        match api
            .delete(
                &crate::build::networkpolicy::overflow_policy_name(name, n),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                // Try again next time.
                lock(&ctx.network_policies).insert(name.to_owned(), before);
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// A Warning Event on the TimeService for each upstream key Secret that became unusable (and
/// a Normal one when it is usable again), once per change: the agents withhold that
/// upstream's polls meanwhile, so the Event is where an admin learns why.
async fn announce_upstream_keys(
    ctx: &Context,
    ts: &TimeService,
    outcomes: &std::collections::BTreeMap<String, std::result::Result<(), KeysProblem>>,
) {
    let name = ts.name_any();
    let before = lock(&ctx.upstream_key_outcomes).insert(name.clone(), outcomes.clone());
    let before = before.unwrap_or_default();
    for (secret, outcome) in outcomes {
        if before.get(secret) == Some(outcome) {
            continue;
        }
        let (kind, reason, message) = match outcome {
            Err(problem) => (
                EventType::Warning,
                "UpstreamKeyUnusable",
                format!("{problem}; the upstreams signed with it are not polled until it is fixed"),
            ),
            Ok(()) if before.contains_key(secret) => (
                EventType::Normal,
                "UpstreamKeyDistributed",
                format!("Secret {secret}: the upstream key is with the agents again"),
            ),
            Ok(()) => continue,
        };
        tracing::info!(time_service = %name, %secret, reason, "{message}");
        ctx.event(&ts.object_ref(&()), kind, reason, message).await;
    }
}

/// Reads Secret `name` in `namespace` and checks it with `check` (`None`: it does not exist);
/// a Secret the operator may not read is `forbidden`'s problem. Other API errors end the
/// reconcile, to be retried.
async fn read_checked<T, P>(
    ctx: &Context,
    namespace: &str,
    name: &str,
    check: impl FnOnce(Option<&Secret>) -> std::result::Result<T, P>,
    forbidden: impl FnOnce() -> P,
) -> Result<std::result::Result<T, P>> {
    match Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(found) => Ok(check(found.as_ref())),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(Err(forbidden())),
        Err(e) => Err(e.into()),
    }
}

/// Records TimeService `name`'s `outcomes` in `held`; the tenants whose outcome changed.
fn changed_outcomes<P: PartialEq + Clone>(
    held: &std::sync::Mutex<std::collections::HashMap<String, super::MaterialOutcomes<P>>>,
    name: &str,
    outcomes: &super::MaterialOutcomes<P>,
) -> std::collections::BTreeSet<crate::ports::TenantKey> {
    let mut held = lock(held);
    let before = held
        .insert(name.to_owned(), outcomes.clone())
        .unwrap_or_default();
    before
        .keys()
        .chain(outcomes.keys())
        .filter(|key| before.get(*key) != outcomes.get(*key))
        .cloned()
        .collect()
}

/// Writes the TimeService's NTS key material Secret (`nts_material`): cookie master keys,
/// rotated when their period is over, and the certificate of each NTS tenant read from the
/// tenant's own Secret. Records each tenant's outcome for its status, triggering the tenants
/// whose outcome changed. Returns the time until the next rotation.
async fn write_nts_material(
    ctx: &Context,
    ts: &TimeService,
    tenants: &[NtsTenant],
) -> Result<std::time::Duration> {
    let name = ts.name_any();
    let own = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let existing = own.get_opt(&names::nts_secret_name(&name)).await?;
    if let Some(existing) = &existing
        && !is_stratums(&existing.metadata)
    {
        tracing::warn!(time_service = %name, secret = %names::nts_secret_name(&name), "a Secret of the NTS key material's name exists that Stratum did not create; left alone, so NTS tenants get no key exchange");
        return Ok(RESYNC);
    }
    let mut gathered = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        // Only ever in the tenant's own namespace, by the name its policy gives.
        let namespace = tenant.key.0.as_str();
        let certificate = match &tenant.certificate_secret {
            None => None,
            Some(secret) => Some(
                read_checked(
                    ctx,
                    namespace,
                    secret,
                    |found| check_certificate(secret, found),
                    || CertificateProblem::Forbidden {
                        secret: secret.clone(),
                    },
                )
                .await?,
            ),
        };
        let keys = match &tenant.keys_secret {
            None => None,
            Some(secret) => Some(
                read_checked(
                    ctx,
                    namespace,
                    secret,
                    |found| check_symmetric_keys(secret, found),
                    || KeysProblem::Forbidden {
                        secret: secret.clone(),
                    },
                )
                .await?,
            ),
        };
        gathered.push(TenantMaterial {
            tenant: tenant.clone(),
            certificate,
            keys,
        });
    }
    // Upstream keys come from the operator's own namespace, by the Secret names the
    // TimeService gives, each checked for every key id its upstreams name.
    let mut upstream_ids: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
    for upstream in &ts.spec.upstreams {
        if let Some(key) = upstream.key.as_ref().filter(|_| !upstream.nts) {
            upstream_ids
                .entry(key.secret_name.as_str())
                .or_default()
                .push(u32::try_from(key.id).unwrap_or(0));
        }
    }
    let mut upstream_keys = Vec::with_capacity(upstream_ids.len());
    for (secret, ids) in upstream_ids {
        let checked = read_checked(
            ctx,
            &ctx.settings.namespace,
            secret,
            |found| check_upstream_keys(secret, &ids, found),
            || KeysProblem::Forbidden {
                secret: secret.to_owned(),
            },
        )
        .await?;
        upstream_keys.push((secret.to_owned(), checked));
    }
    let period = ts.spec.serving.nts_cookie_key_rotation();
    let mut fresh_key = || {
        let mut key = [0u8; COOKIE_KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        key
    };
    let request = ts
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROTATE_REQUEST_ANNOTATION))
        .map(String::as_str);
    let cookie_keys = plan_cookie_keys(
        existing.as_ref(),
        Timestamp::now(),
        period,
        request,
        &mut fresh_key,
    );
    let material = build_nts_secret(ts, &ctx.settings, &cookie_keys, upstream_keys, gathered)?;
    apply_namespaced(&ctx.client, &material.secret).await?;
    announce_upstream_keys(ctx, ts, &material.upstream_outcomes).await;
    if let Some(at) = cookie_keys.request_waits_until {
        tracing::info!(time_service = %name, %at, "NTS cookie key rotation requested; it waits for the spacing after the last rotation");
        // The same message for one request (an absolute time), so repeats fold into one Event.
        ctx.event(
            &ts.object_ref(&()),
            EventType::Normal,
            "NtsCookieKeyRotationWaiting",
            format!(
                "cookie key rotation requested ({ROTATE_REQUEST_ANNOTATION}); it happens at {at}, \
                 {} after the last rotation, so that every agent holds the key it makes current",
                kube::core::Duration::from(ROTATION_REQUEST_SPACING)
            ),
        )
        .await;
    }
    if cookie_keys.rotated {
        tracing::info!(time_service = %name, current = cookie_keys.file.current.id, requested = cookie_keys.requested, next_rotation_in = ?cookie_keys.rotate_in, "NTS cookie master keys rotated");
        if existing.is_some() {
            ctx.event(
                &ts.object_ref(&()),
                EventType::Normal,
                "NtsCookieKeysRotated",
                format!(
                    "NTS cookie master key {} now seals new cookies{}; cookies of key {} still \
                     open until the next rotation, in {}",
                    cookie_keys.file.current.id,
                    if cookie_keys.requested {
                        format!(" (rotated on request: {ROTATE_REQUEST_ANNOTATION})")
                    } else {
                        String::new()
                    },
                    cookie_keys
                        .file
                        .previous
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |k| k.id.to_string()),
                    kube::core::Duration::from(cookie_keys.rotate_in)
                ),
            )
            .await;
        }
    }
    let mut changed = changed_outcomes(&ctx.nts_outcomes, &name, &material.outcomes);
    changed.extend(changed_outcomes(
        &ctx.key_outcomes,
        &name,
        &material.key_outcomes,
    ));
    if !changed.is_empty()
        && let Some(senders) = ctx.triggers.get()
    {
        senders.send(crate::index::Triggers {
            tenants: changed,
            ..Default::default()
        });
    }
    // A certificate or key Secret that is not there yet (cert-manager still issuing) is
    // looked for again soon; renewals of one that is are picked up at the resync.
    let waiting = material.outcomes.values().any(Result::is_err)
        || material.key_outcomes.values().any(Result::is_err)
        || material.upstream_outcomes.values().any(Result::is_err);
    Ok(if waiting {
        cookie_keys.rotate_in.min(NTS_RETRY)
    } else {
        cookie_keys.rotate_in
    })
}

/// How soon a TimeService whose NTS tenants miss a usable certificate looks again.
const NTS_RETRY: std::time::Duration = std::time::Duration::from_secs(15);

fn counts(ds: &DaemonSet) -> DaemonSetCounts {
    let s = ds.status.clone().unwrap_or_default();
    DaemonSetCounts {
        desired: s.desired_number_scheduled,
        ready: s.number_ready,
        updated: s.updated_number_scheduled.unwrap_or_default(),
    }
}

/// Deletes the TimeService's DaemonSet, if it exists and is Stratum's: a DaemonSet of that
/// name that someone else created is never touched (the uid precondition keeps a replacement
/// made between the read and the delete safe too).
async fn delete_daemonset(ctx: &Context, name: &str) -> Result<()> {
    let api = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let Some(existing) = api.get_opt(&names::agent_name(name)).await? else {
        return Ok(());
    };
    if !is_stratums(&existing.metadata) {
        tracing::warn!(time_service = %name, "a DaemonSet of the agents' name exists that Stratum did not create; left alone");
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(&names::agent_name(name), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the agent config when its revision changed, at most once per coalescing interval,
/// and records an Event per audited change. Returns how long to wait when the write is held.
async fn write_config(
    ctx: &Context,
    ts: &TimeService,
    config: &AgentConfig,
    config_map: &ConfigMap,
    tenants: &std::collections::BTreeMap<String, (String, String, Option<String>)>,
) -> Result<Option<std::time::Duration>> {
    let name = ts.name_any();
    let known = lock(&ctx.last_config).get(&name).cloned();
    let previous = match known {
        Some(previous) => Some(previous),
        // First pass since start: the ConfigMap in the cluster is the audit baseline.
        None => read_current_config(ctx, &name).await?,
    };
    if previous
        .as_ref()
        .is_some_and(|p| p.revision == config.revision)
    {
        lock(&ctx.last_config).insert(name, config.clone());
        return Ok(None);
    }
    let now = Instant::now();
    let decision = lock(&ctx.coalescer).decide(&name, now);
    if let Decision::WriteAt(at) = decision {
        ctx.metrics.config_writes.with_label_values(&["held"]).inc();
        if let Some(previous) = previous {
            lock(&ctx.last_config).insert(name, previous);
        }
        return Ok(Some(at.saturating_duration_since(now)));
    }
    apply_namespaced(&ctx.client, config_map).await?;
    ctx.metrics
        .config_writes
        .with_label_values(&["written"])
        .inc();
    lock(&ctx.propagation).insert(name.clone(), (config.revision.clone(), now));
    lock(&ctx.last_config).insert(name.clone(), config.clone());
    let ts_ref = ts.object_ref(&());
    for change in audit::changes(previous.as_ref(), config) {
        let reference = match change.tenant_id().and_then(|id| tenants.get(id)) {
            Some((ns, tenant, uid)) => tenant_reference(ns, tenant, uid.as_deref()),
            None => ts_ref.clone(),
        };
        tracing::info!(time_service = %name, reason = change.reason(), note = %change.note(), "agent config changed");
        ctx.event(
            &reference,
            EventType::Normal,
            change.reason(),
            change.note(),
        )
        .await;
    }
    Ok(None)
}

/// Keeps the count of nodes off their designated sources (TimeServices gone from the index
/// drop out), and records a Warning when a node newly is, and a Normal Event when it is back.
async fn observe_off_designated(ctx: &Context, ts: &TimeService, nodes: &[String]) {
    let name = ts.name_any();
    let now: BTreeSet<String> = nodes.iter().cloned().collect();
    let (before, total) = {
        let existing: BTreeSet<String> = lock(&ctx.index).time_services().keys().cloned().collect();
        let mut all = lock(&ctx.off_designated);
        let before = all.insert(name.clone(), now.clone()).unwrap_or_default();
        all.retain(|ts, _| *ts == name || existing.contains(ts));
        (before, all.values().map(BTreeSet::len).sum::<usize>())
    };
    ctx.metrics
        .nodes_off_designated
        .set(i64::try_from(total).unwrap_or(i64::MAX));
    let reference = ts.object_ref(&());
    for node in now.difference(&before) {
        tracing::warn!(time_service = %name, %node, "a node reports sources its TimeService does not designate");
        ctx.event(
            &reference,
            EventType::Warning,
            "SourcesNotDesignated",
            format!(
                "node {node} reports time sources this TimeService does not designate (see \
                 its NodeClock); its agent does not run this TimeService's config"
            ),
        )
        .await;
    }
    for node in before.difference(&now) {
        ctx.event(
            &reference,
            EventType::Normal,
            "SourcesDesignated",
            format!("node {node} reports only designated sources again, or no longer reports"),
        )
        .await;
    }
}

fn tenant_reference(
    ns: &str,
    name: &str,
    uid: Option<&str>,
) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(stratum_api::TenantTimePolicy::api_version(&()).into_owned()),
        kind: Some(stratum_api::TenantTimePolicy::kind(&()).into_owned()),
        namespace: Some(ns.to_owned()),
        name: Some(name.to_owned()),
        uid: uid.map(str::to_owned),
        ..Default::default()
    }
}

async fn read_current_config(ctx: &Context, name: &str) -> Result<Option<AgentConfig>> {
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let current = api.get_opt(&names::agent_config_map_name(name)).await?;
    // An unreadable one is no baseline: every tenant is then reported as added.
    Ok(current.and_then(|cm| AgentConfig::from_config_map(&cm).ok()))
}

/// Records the propagation latency once every desired agent reports the written revision.
fn observe_propagation(
    ctx: &Context,
    name: &str,
    clocks: &[crate::model::ClockInfo],
    desired: i32,
) {
    let mut pending = lock(&ctx.propagation);
    let Some((revision, written)) = pending.get(name) else {
        return;
    };
    let reporting = clocks
        .iter()
        .filter(|c| c.config_revision.as_deref() == Some(revision.as_str()))
        .count();
    if desired > 0 && reporting >= usize::try_from(desired).unwrap_or(usize::MAX) {
        ctx.metrics
            .config_propagation
            .observe(written.elapsed().as_secs_f64());
        pending.remove(name);
    }
}

/// Events for a new conflict or refusal (only on the transition, not on every pass).
async fn announce_transitions(
    ctx: &Context,
    ts: &TimeService,
    current: Option<&stratum_api::TimeServiceStatus>,
    blocked: &Option<Blocked>,
) {
    let was = |type_: &str, reason: Option<&str>| {
        current.is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == type_ && c.status == "True" && reason.is_none_or(|r| c.reason == r)
            })
        })
    };
    match blocked {
        Some(Blocked::Conflict { with }) if !was("Conflict", None) => {
            let note = format!(
                "nodes overlap those of the older TimeService {with:?}; its agents keep them"
            );
            ctx.event(&ts.object_ref(&()), EventType::Warning, "Conflict", note)
                .await;
        }
        Some(Blocked::Invalid(why)) if !was("Degraded", Some("InvalidSpec")) => {
            ctx.event(
                &ts.object_ref(&()),
                EventType::Warning,
                "Refused",
                why.clone(),
            )
            .await;
        }
        _ => {}
    }
}

/// Error policy: user errors wait for a change; transient ones back off.
pub fn error_policy(
    obj: Arc<DeserializeGuard<TimeService>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failed(CONTROLLER, error);
    let name = match &obj.0 {
        Ok(ts) => ts.name_any(),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    tracing::warn!(time_service = %name, error = %error, "reconcile failed");
    ctx.error_action(&name, error)
}
