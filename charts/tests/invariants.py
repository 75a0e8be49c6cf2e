"""Checks a rendered Parley chart (`helm template` output) against what platform teams require of it.

    python invariants.py rendered.yaml [--parley path/to/parley]

Every Deployment has resource requests, startup/liveness/readiness probes (gRPC health for gRPC
services), the hardened security context, a preStop hook, spreading and a config checksum; every
HPA and ScaledObject targets a Deployment of the chart, and never both the same one; no ConfigMap
holds a credential; every Secret a pod reads is rendered by the chart or named as an existing Secret;
the migrate Job is a pre-install/pre-upgrade hook whose Secret exists before it runs; every PDB,
Service and NetworkPolicy selects pods of the chart; and the rendered parley.toml passes
`parley check-config`. Prints each violation and exits 1 when there is any.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import yaml

problems = []


def problem(obj, message):
    problems.append(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {message}")


def matches(selector, labels):
    return all(labels.get(key) == value for key, value in (selector or {}).items())


CREDENTIAL_KEYS = re.compile(r"(DATABASE_URL|DATABASE_REPLICA_URLS|REDIS_URL|NATS_URL|SECRETS_KEY|CURSOR_SECRET|API_KEY|PASSWORD|TOKEN)", re.I)
CREDENTIAL_VALUES = re.compile(r"(://[^/\s:@]+:[^/\s@]+@|\bsk-[A-Za-z0-9]{8,}|api_key\s*=\s*\"[^\"]+\")")


def check_pod(obj, spec, secrets, existing):
    pod = spec["template"]["spec"]
    security = pod.get("securityContext", {})
    if not security.get("runAsNonRoot"):
        problem(obj, "pod securityContext.runAsNonRoot is not true")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(obj, "pod seccompProfile is not RuntimeDefault")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problem(obj, f"container {container['name']}: allowPrivilegeEscalation is not false")
        if context.get("readOnlyRootFilesystem") is not True:
            problem(obj, f"container {container['name']}: root filesystem is not read-only")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problem(obj, f"container {container['name']}: capabilities are not all dropped")
        if not context.get("runAsNonRoot"):
            problem(obj, f"container {container['name']}: runAsNonRoot is not true")
        requests = container.get("resources", {}).get("requests", {})
        if "cpu" not in requests or "memory" not in requests:
            problem(obj, f"container {container['name']}: no cpu and memory requests")
        if "memory" not in container.get("resources", {}).get("limits", {}):
            problem(obj, f"container {container['name']}: no memory limit")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] not in secrets and ref["name"] not in existing:
                problem(obj, f"reads Secret {ref['name']}, which is neither rendered nor an existing Secret")
        for source in container.get("envFrom", []):
            name = source.get("secretRef", {}).get("name")
            if name and name not in secrets and name not in existing:
                problem(obj, f"envFrom Secret {name} is neither rendered nor an existing Secret")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("--values", required=True, help="the values file the manifests were rendered with")
    parser.add_argument("--parley", help="the parley binary, to run check-config on the rendered parley.toml")
    args = parser.parse_args()
    with open(args.rendered) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    with open(args.values) as f:
        values = yaml.safe_load(f) or {}
    existing = {
        name
        for name in [
            values.get("database", {}).get("existingSecret"),
            values.get("redis", {}).get("existingSecret"),
            values.get("nats", {}).get("existingSecret"),
            values.get("secrets", {}).get("existingSecret"),
            values.get("providerKeysExistingSecret"),
        ]
        if name
    }

    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    # The fake LLM, when the values ask for it, runs `parley fake-llm`, and the agents are pointed at it.
    fakes = {n: d for n, d in deployments.items() if d["metadata"]["labels"].get("app.kubernetes.io/component") == "fake-llm"}
    for name in fakes:
        deployments.pop(name)
    for name, fake in fakes.items():
        if fake["spec"]["template"]["spec"]["containers"][0].get("args", [None])[0] != "fake-llm":
            problem(fake, "does not run `parley fake-llm`")
        pointed = [c for c in by_kind.get("ConfigMap", []) if (c.get("data") or {}).get("PARLEY_FAKE_LLM_URL", "").startswith(f"http://{name}:")]
        if not pointed:
            problem(fake, "no ConfigMap points fake providers at it (PARLEY_FAKE_LLM_URL)")
    if len(deployments) != 6:
        problems.append(f"expected 6 Deployments (one per service), found {sorted(deployments)}")

    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        check_pod(deployment, spec, secrets, existing)
        container = pod["containers"][0]
        if container.get("args", [None])[0] != "serve" or len(container["args"]) != 2:
            problem(deployment, f"does not run `parley serve <service>`: {container.get('args')}")
        grpc_service = any(port.get("name") == "grpc" for port in container.get("ports", []))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in container:
                problem(deployment, f"no {probe}")
        if grpc_service:
            for probe in ("startupProbe", "livenessProbe"):
                if "grpc" not in container.get(probe, {}):
                    problem(deployment, f"{probe} of a gRPC service is not a gRPC health check")
        if "preStop" not in container.get("lifecycle", {}):
            problem(deployment, "no preStop hook")
        if pod.get("terminationGracePeriodSeconds", 30) < 30:
            problem(deployment, "terminationGracePeriodSeconds under 30 s leaves no time to drain")
        if not pod.get("topologySpreadConstraints"):
            problem(deployment, "no topologySpreadConstraints")
        annotations = spec["template"]["metadata"].get("annotations", {})
        if "checksum/config" not in annotations:
            problem(deployment, "no checksum/config annotation: pods would not roll on a config change")
        env = {e["name"]: e for e in container.get("env", [])}
        for required in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
            if required not in env:
                problem(deployment, f"no {required}")
        if not matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
            problem(deployment, "selector does not match its pod template")

    scaled = {}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        if target.get("kind") != "Deployment" or target.get("name") not in deployments:
            problem(hpa, f"targets {target}, not a Deployment of this chart")
        scaled.setdefault(target.get("name"), []).append("HPA")
        if "behavior" not in hpa["spec"]:
            problem(hpa, "no scale-up/down behavior")
        kinds = {metric["type"] for metric in hpa["spec"].get("metrics", [])}
        if "Resource" not in kinds:
            problem(hpa, "no CPU/memory targets")
    for scaled_object in by_kind.get("ScaledObject", []):
        target = scaled_object["spec"]["scaleTargetRef"]
        if target.get("name") not in deployments:
            problem(scaled_object, f"targets {target}, not a Deployment of this chart")
        scaled.setdefault(target.get("name"), []).append("ScaledObject")
    for name, scalers in scaled.items():
        if len(scalers) > 1:
            problems.append(f"Deployment/{name}: scaled by {' and '.join(scalers)} at once")
        elif "replicas" in deployments.get(name, {}).get("spec", {}):
            problems.append(f"Deployment/{name}: sets replicas although {scalers[0]} scales it")

    for config_map in by_kind.get("ConfigMap", []):
        for key, value in (config_map.get("data") or {}).items():
            if CREDENTIAL_KEYS.search(key):
                problem(config_map, f"key {key} looks like a credential")
            if CREDENTIAL_VALUES.search(value or ""):
                problem(config_map, f"value of {key} holds a credential")

    for job in by_kind.get("Job", []):
        check_pod(job, job["spec"], secrets, existing)
        hooks = job["metadata"].get("annotations", {}).get("helm.sh/hook", "")
        if job["metadata"]["name"].endswith("-migrate"):
            if set(hooks.split(",")) != {"pre-install", "pre-upgrade"}:
                problem(job, f"the migrate Job must be a pre-install,pre-upgrade hook, is {hooks!r}")
            weight = int(job["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
            for env in job["spec"]["template"]["spec"]["containers"][0].get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if not ref or ref["name"] in existing:
                    continue
                secret = secrets.get(ref["name"], {})
                secret_annotations = secret.get("metadata", {}).get("annotations", {})
                secret_hooks = secret_annotations.get("helm.sh/hook", "")
                if "pre-install" not in secret_hooks or int(secret_annotations.get("helm.sh/hook-weight", "0")) >= weight:
                    problem(job, f"reads Secret {ref['name']}, which does not exist yet when the hook runs")
    for cron_job in by_kind.get("CronJob", []):
        check_pod(cron_job, cron_job["spec"]["jobTemplate"]["spec"], secrets, existing)

    # gRPC clients balance over the addresses a name resolves to: every gRPC target must be a headless
    # Service (one address per ready pod) on the gRPC port, selecting the pods of that service.
    services = {svc["metadata"]["name"]: svc for svc in by_kind.get("Service", [])}
    for config_map in by_kind.get("ConfigMap", []):
        for key in ("PARLEY_USER_URL", "PARLEY_CHAT_URL", "PARLEY_QUOTA_URL", "PARLEY_ANALYTICS_URL", "PARLEY_AGENT_URL"):
            url = (config_map.get("data") or {}).get(key)
            if url is None:
                continue
            match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
            target = services.get(match.group(1)) if match else None
            if target is None:
                problem(config_map, f"{key} {url} names no Service of this chart")
                continue
            if target["spec"].get("clusterIP") != "None":
                problem(target, f"{key} points at it, but it is not headless: clients would reach one replica")
            if not any(port.get("port") == int(match.group(2)) for port in target["spec"].get("ports", [])):
                problem(target, f"{key} uses port {match.group(2)}, which it does not expose")
            component = key.removeprefix("PARLEY_").removesuffix("_URL").lower()
            if target["spec"]["selector"].get("app.kubernetes.io/component") != component:
                problem(target, f"{key} points at it, but it does not select the {component} pods")
    # An agent hands back what it cannot finish before the kubelet's SIGKILL.
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        if deployment["metadata"]["labels"].get("app.kubernetes.io/component") == "agent":
            drain = int(env.get("PARLEY_AGENT_DRAIN_SECS") or 0)
            if not 0 < drain < pod.get("terminationGracePeriodSeconds", 30):
                problem(deployment, f"PARLEY_AGENT_DRAIN_SECS {drain} is not within the termination grace period")

    pods = [d["spec"]["template"]["metadata"]["labels"] for d in [*deployments.values(), *fakes.values()]]
    for kind in ("PodDisruptionBudget", "Service", "NetworkPolicy"):
        for obj in by_kind.get(kind, []):
            selector = obj["spec"].get("selector", {})
            selector = selector.get("matchLabels", selector) if kind != "NetworkPolicy" else obj["spec"]["podSelector"]["matchLabels"]
            if not any(matches(selector, labels) for labels in pods):
                problem(obj, "selects no pod of this chart")
    if values.get("networkPolicy", {}).get("enabled", True):
        covered = {obj["metadata"]["name"] for obj in by_kind.get("NetworkPolicy", [])}
        for name in deployments:
            if name not in covered:
                problems.append(f"Deployment/{name}: no NetworkPolicy")

    for rule in by_kind.get("PrometheusRule", []):
        alerts = [r for group in rule["spec"].get("groups", []) for r in group.get("rules", []) if "alert" in r]
        for alert in alerts:
            if not alert.get("annotations", {}).get("runbook_url"):
                problem(rule, f"alert {alert['alert']} has no runbook_url")

    if args.parley:
        config_maps = [c for c in by_kind.get("ConfigMap", []) if "parley.toml" in (c.get("data") or {})]
        for config_map in config_maps:
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                f.write(config_map["data"]["parley.toml"])
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "DATABASE_", "REDIS_", "NATS_"))}
            env.update({k: v for k, v in config_map["data"].items() if k != "parley.toml"})
            env["PARLEY_CONFIG"] = f.name
            result = subprocess.run([args.parley, "check-config"], env=env, capture_output=True, text=True)
            os.unlink(f.name)
            if result.returncode != 0:
                problem(config_map, f"parley check-config rejects the rendered configuration: {result.stderr.strip()}")

    for line in problems:
        print(f"  invariant broken: {line}")
    print(f"{args.rendered}: {len(objects)} objects, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
