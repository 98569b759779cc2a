"""Checks what the deploy files must agree on, without a container engine:
service names, ports and the health-checked service between the compose
file, Envoy's config, the Kubernetes manifests and the server's defaults."""
import pathlib
import sys

import yaml

here = pathlib.Path(__file__).parent
compose = yaml.safe_load((here / "docker-compose.yml").read_text())
envoy = yaml.safe_load((here / "envoy.yaml").read_text())
k8s = [doc for f in sorted((here / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text())]
problems = []

services = compose["services"]
offload_env = services["offload"]["environment"]
grpc_port = int(offload_env["OFFLOAD_LISTEN"].rsplit(":", 1)[1])

cluster = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "offload")
address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
if address["address"] not in services:
    problems.append(f"envoy routes to {address['address']!r}, not a compose service")
if address["port_value"] != grpc_port:
    problems.append(f"envoy routes to port {address['port_value']}, offload listens on {grpc_port}")
if str(grpc_port) not in [str(p) for p in services["offload"].get("expose", [])]:
    problems.append(f"offload does not expose its gRPC port {grpc_port}")
health = cluster["health_checks"][0]["grpc_health_check"]["service_name"]
if health != "offload.v1.Compute":
    problems.append(f"envoy health-checks {health!r}")
listener_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
if not any(str(p).endswith(f":{listener_port}") for p in services["envoy"]["ports"]):
    problems.append(f"envoy's listener port {listener_port} is not published")
otlp = offload_env["OTEL_EXPORTER_OTLP_ENDPOINT"]
if otlp.split("//")[1].split(":")[0] not in services:
    problems.append(f"traces go to {otlp}, not a compose service")
grace = float(offload_env["OFFLOAD_SHUTDOWN_GRACE_SECS"])
stop = float(services["offload"]["stop_grace_period"].rstrip("s"))
if grace >= stop:
    problems.append(f"drain grace {grace}s is not below stop_grace_period {stop}s")

deployment = next(d for d in k8s if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
container = pod["containers"][0]
env = {e["name"]: e.get("value") for e in container["env"]}
k8s_port = int(env["OFFLOAD_LISTEN"].rsplit(":", 1)[1])
if container["readinessProbe"]["grpc"]["port"] != k8s_port:
    problems.append("the readiness probe checks another port than OFFLOAD_LISTEN")
if float(env["OFFLOAD_SHUTDOWN_GRACE_SECS"]) + 5 >= pod["terminationGracePeriodSeconds"]:
    problems.append("terminationGracePeriodSeconds does not cover the preStop pause and the drain grace")
for svc in (d for d in k8s if d["kind"] == "Service"):
    if svc["spec"]["selector"] != deployment["spec"]["selector"]["matchLabels"]:
        problems.append(f"service {svc['metadata']['name']} selects other pods")

def memory_bytes(text):
    """A compose or Kubernetes memory quantity (2g, 2Gi, 512Mi) in bytes."""
    # Compose's k/m/g (with or without b) are binary units, like Kubernetes' Ki/Mi/Gi.
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    text = str(text).strip().lower().rstrip("b")
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


# The front's in-flight budget plus its workers' recycling thresholds must
# leave room for the front itself inside the memory limit.
for where, limit, settings in [
    ("compose", services["offload"]["mem_limit"], offload_env),
    ("k8s", container["resources"]["limits"]["memory"], env),
]:
    limit = memory_bytes(limit)
    budget = int(settings["OFFLOAD_MAX_INFLIGHT_BYTES"])
    workers = int(settings["OFFLOAD_WORKERS"]) * int(settings["OFFLOAD_WORKER_MAX_RSS_BYTES"])
    if budget > limit // 4 or budget + workers + (128 << 20) > limit:
        problems.append(f"{where}: budget {budget} + workers {workers} do not fit the memory limit {limit}")

# Locked down in both (issue 14): read-only root with a writable /tmp for
# the workers' scratch folders, no capabilities, no privilege gain, the
# runtime's default seccomp profile.
offload = services["offload"]
if offload.get("read_only") is not True or offload.get("cap_drop") != ["ALL"]:
    problems.append("compose: offload must run read_only with cap_drop [ALL]")
if "no-new-privileges:true" not in offload.get("security_opt", []):
    problems.append("compose: offload must set no-new-privileges")
if not any(str(t).startswith("/tmp") for t in offload.get("tmpfs", [])):
    problems.append("compose: offload needs a tmpfs on /tmp (the workers' scratch folders)")
security = container.get("securityContext", {})
if not (
    security.get("readOnlyRootFilesystem") is True
    and security.get("allowPrivilegeEscalation") is False
    and security.get("capabilities", {}).get("drop") == ["ALL"]
):
    problems.append("k8s: the container must have a read-only root, no privilege escalation, all capabilities dropped")
if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
    problems.append("k8s: the pod must use the RuntimeDefault seccomp profile")
mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
if "/tmp" not in mounts or not any(v["name"] == mounts["/tmp"] and "emptyDir" in v for v in pod.get("volumes", [])):
    problems.append("k8s: /tmp must be an emptyDir (the workers' scratch folders)")

if problems:
    print("deploy files disagree:\n- " + "\n- ".join(problems))
    sys.exit(1)
print("deploy files agree")
