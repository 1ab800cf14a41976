"""The shipped configs stay loadable: jobs/ against raydistill's models, clusters/ against Ray's.

Fast and offline: nothing here starts Ray, contacts a cloud or needs a GPU. The cluster
launcher files go through the same preparation and checks that `ray up` applies before it
contacts a provider (ray-schema.json via jsonschema, then Ray's own validate_config).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydistill import config as C
from raydistill.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]  # the repository
JOBS = ROOT / "jobs"
CLUSTERS = ROOT / "clusters"

MARKER = re.compile(r"^# raydistill-config: (\w+)\s*$")
MODELS = {m.__name__: m for m in (C.CaptureConfig, C.SelectConfig, C.TrainConfig, C.EvalConfig, C.DemoConfig, C.SweepConfig)}
EXPECTED_CONFIGS = {
    "capture.yaml": "CaptureConfig",
    "capture-s3.yaml": "CaptureConfig",
    "train-kd.yaml": "TrainConfig",
    "train-ce.yaml": "TrainConfig",
    "train-corpus.yaml": "TrainConfig",
    "sweep.yaml": "SweepConfig",
    "select.yaml": "SelectConfig",
}
NOT_CONFIGS = {"runtime_env.yaml"}  # every other jobs/*.yaml must carry the marker line
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml", "local.yaml")
KUBERAY_FILES = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _marker(path: Path) -> str | None:
    match = MARKER.match(path.read_text().splitlines()[0])
    return match.group(1) if match else None


def _load_job(name: str, overrides: list[str] = ()):
    return C.load_config(MODELS[_marker(JOBS / name)], JOBS / name, list(overrides))


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- jobs/ -----------------------------------------------------------------------------


def test_every_job_yaml_is_a_known_config_or_listed_as_not_one():
    names = {p.name for p in JOBS.glob("*.yaml")}
    marked = {name: _marker(JOBS / name) for name in names if _marker(JOBS / name)}
    assert marked == EXPECTED_CONFIGS
    assert names - set(marked) == NOT_CONFIGS


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_job_config_loads_into_its_model(name):
    cfg = _load_job(name)
    assert type(cfg).__name__ == EXPECTED_CONFIGS[name]


def test_capture_configs_use_the_demo_teacher_and_default_corpus():
    local, s3 = _load_job("capture.yaml"), _load_job("capture-s3.yaml")
    for cfg in (local, s3):
        assert cfg.teacher == "raydistill-demo/teacher"
        assert cfg.corpus.source == "default" and cfg.corpus.split == "train"
    assert s3.output == "s3://bucket/prefix/shards"
    assert not local.output.startswith("s3://")
    # Same capture settings, only the destination differs.
    assert local.model_dump(exclude={"output"}) == s3.model_dump(exclude={"output"})


def test_train_configs_read_the_capture_and_differ_only_in_the_loss():
    capture, kd, ce = _load_job("capture.yaml"), _load_job("train-kd.yaml"), _load_job("train-ce.yaml")
    assert kd.shards == ce.shards == capture.output
    assert kd.student.size == ce.student.size == "small"
    assert (kd.loss, ce.loss) == ("forward_kl", "ce")
    assert kd.output != ce.output and kd.name != ce.name
    same = {"output", "name", "loss"}
    assert kd.model_dump(exclude=same) == ce.model_dump(exclude=same)


def test_corpus_train_config_is_ce_on_text_with_its_own_tokenizer():
    cfg = _load_job("train-corpus.yaml")
    assert cfg.shards is None and cfg.corpus.source.endswith("select/refined")
    assert cfg.loss == "ce" and cfg.corpus_tokenizer == cfg.tokenizer and cfg.student.size == "small"
    with pytest.raises(C.ConfigError, match="loss: ce"):
        _load_job("train-corpus.yaml", ["loss=forward_kl"])


def test_student_kinds_parse_from_yaml_and_set_overrides(tmp_path):
    def student(text: str, overrides: list[str] = ()) -> C.StudentConfig:
        path = tmp_path / "train.yaml"
        path.write_text("shards: s\noutput: o\n" + text)
        return C.load_config(C.TrainConfig, path, list(overrides)).student

    assert student("student: base\n") == C.StudentConfig(size="base") and student("").size == "tiny"
    shape = student("student: {family: qwen2, hidden: 512, layers: 8, heads: 8, kv_heads: 2, intermediate: 1408}\n")
    assert shape.kind == "shape" and (shape.kv_heads, shape.tied, shape.max_positions) == (2, None, None)
    fraction = student("student:\n  teacher_fraction: {depth: 0.5, init: teacher}\n")
    assert fraction.kind == "teacher_fraction" and fraction.teacher_fraction.width == 1.0
    assert student("student: {config: /models/arch}\n").kind == "config"
    assert student("student: {model: /models/m}\n").kind == "model"
    assert student("student: {size: tiny}\n", ["student.size=small"]).size == "small"
    with pytest.raises(C.ConfigError, match=r"'student': Value error, the student sets student\.size and "
                                            r"student\.model: a student is exactly one of"):
        student("student: {size: tiny, model: /m}\n")
    with pytest.raises(C.ConfigError, match=r"unknown key 'student\.hiden'"):
        student("student: {family: llama, hiden: 64, layers: 2, heads: 2}\n")
    with pytest.raises(C.ConfigError, match=r"'student\.hidden': Input should be greater than or equal to 1"):
        student("student: {family: llama, hidden: 0, layers: 2, heads: 2}\n")


def test_a_student_records_only_what_it_sets_so_older_runs_compare_equal():
    assert C.StudentConfig().model_dump() == {"model": None, "size": "tiny"}  # as before students had shapes
    assert C.StudentConfig(family="llama", hidden=64, layers=2, heads=2).model_dump() == {
        "size": None, "model": None, "family": "llama", "hidden": 64, "layers": 2, "heads": 2}
    shape = C.StudentConfig(family="llama", hidden=64, layers=2, heads=2)
    assert C.StudentConfig.model_validate(shape.model_dump()) == shape
    assert shape.model_dump() != shape.model_copy(update={"layers": 3}).model_dump()  # another shape, another run


def test_a_sweep_ladder_takes_size_names_and_students():
    cfg = C.SweepConfig(shards="s", output="o", sizes=["micro", {"family": "qwen2", "hidden": 64, "layers": 2,
                                                                 "heads": 4, "name": "q"}])
    assert [s.kind for s in cfg.sizes] == ["size", "shape"] and cfg.sizes[1].name == "q"
    assert cfg.sizes[1].student() == C.StudentConfig(family="qwen2", hidden=64, layers=2, heads=4)
    assert [s.size for s in C.SweepConfig(shards="s", output="o").sizes] == ["micro", "tiny", "small", "base"]
    assert [s.size for s in _load_job("sweep.yaml").sizes] == ["micro", "tiny", "small", "base"]


def test_job_config_typo_is_refused():
    with pytest.raises(C.ConfigError, match="unknown key 'kk'"):
        _load_job("capture.yaml", ["kk=3"])


def test_runtime_env_uses_known_fields():
    from ray.runtime_env import RuntimeEnv

    data = _yaml(JOBS / "runtime_env.yaml")
    assert set(data) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**data)  # Ray's own type checks


def _readme_commands(text: str) -> list[list[str]]:
    """Every `raydistill ...` command inside the README's bash blocks, as argv after 'raydistill'."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.replace("$PWD", "/abs/repo"), comments=True)
            if "raydistill" in words:
                commands.append(words[words.index("raydistill") + 1 :])
    return commands


def _check_command(argv: list[str]):
    """Parse one documented command; for capture/train also load its config with its --set values."""
    args = build_parser().parse_args(argv)
    if args.command in ("capture", "precompute", "train"):
        model = C.TrainConfig if args.command == "train" else C.CaptureConfig
        return args, C.load_config(model, ROOT / args.config, args.overrides)
    return args, None


def test_jobs_readme_commands_parse_and_their_configs_load():
    text = (JOBS / "README.md").read_text()
    commands = _readme_commands(text)
    assert {"demo", "capture", "train", "evaluate", "verify"} <= {argv[0] for argv in commands}
    for argv in commands:
        args, cfg = _check_command(argv)
        for override in getattr(args, "overrides", []):  # absolute paths replace the relative ones
            key = override.split("=")[0]
            assert getattr(cfg, key).startswith("/abs/repo/raydistill-demo/"), override
    submits = re.findall(r"^ray job submit .*$", text, flags=re.M)
    assert len(submits) == 3
    for line in submits:
        assert "--address http://127.0.0.1:8265" in line
        assert "--working-dir . --runtime-env jobs/runtime_env.yaml -- python -m raydistill" in line
    assert "ray start --head --port=6379 --dashboard-port=8265" in text
    assert "ray stop" in text


def test_operations_doc_commands_parse_and_their_configs_load():
    commands = _readme_commands((ROOT / "docs" / "operations.md").read_text())
    assert {"demo", "capture", "train", "evaluate"} <= {argv[0] for argv in commands}
    for argv in commands:
        _check_command(argv)


# --- clusters/: Ray cluster launcher -----------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_matches_rays_schema(name, ray_schema):
    jsonschema.validate(_yaml(CLUSTERS / name), ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_ray_up_preparation(name, ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_yaml(CLUSTERS / name))
    validate_config(prepared)  # schema again, after defaults, plus head type and worker bounds
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_vacuous(ray_schema):
    bad = _yaml(CLUSTERS / "aws.yaml")
    bad["available_node_types"]["ray.worker.capture"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_clusters_have_cpu_head_and_gpu_capture_and_train_types(name):
    cfg = _yaml(CLUSTERS / name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    for role in ("capture", "train"):
        (key,) = [k for k in types if role in k]
        node = types[key]
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"]
        if name == "gcp.yaml":  # GCE does not report GPUs itself
            assert node["resources"]["GPU"] >= 1
            assert {"onHostMaintenance": "TERMINATE"} in node["node_config"]["scheduling"]
        else:  # EC2 resources are detected from the instance type: a GPU family
            assert node["node_config"]["InstanceType"][0] in "gp"
    assert cfg["docker"]["worker_image"].endswith("-gpu")


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_raydistill_with_pinned_torch_from_the_mounted_repo(name):
    cfg = _yaml(CLUSTERS / name)
    mounts = cfg["file_mounts"]
    assert "." in mounts.values()
    remote = next(r for r, local in mounts.items() if local == ".")
    install = " ".join(cfg["setup_commands"])
    assert re.search(r'"torch==\d+\.\d+\.\d+"', install)
    assert f"-e {remote}" in install


def test_local_cluster_lists_hosts():
    cfg = _yaml(CLUSTERS / "local.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert cfg["max_workers"] == len(provider["worker_ips"])


# --- clusters/: KubeRay -------------------------------------------------------------------


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_has_head_and_gpu_workers_with_image_and_resources(name):
    doc = _yaml(CLUSTERS / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}[name]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    head = _containers(spec["headGroupSpec"])
    assert head and all(c["image"] and c["resources"]["limits"] for c in head)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group):
            assert c["image"]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_entrypoint_is_a_valid_capture_command():
    doc = _yaml(CLUSTERS / "kuberay-rayjob.yaml")
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "raydistill", "capture"]
    args = build_parser().parse_args(words[3:])
    image_root = "/home/ray/raydistill/"  # where clusters/Dockerfile copies jobs/
    assert args.config.startswith(image_root)
    cfg = C.load_config(C.CaptureConfig, ROOT / args.config[len(image_root) :], args.overrides)
    assert cfg.output.startswith(("s3://", "gs://"))  # pods share no filesystem
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) for g in workers)
    assert cfg.num_gpus_per_actor == 1 and cfg.num_actors == gpus


def test_every_cluster_file_names_the_same_ray_version():
    versions = set()
    for path in CLUSTERS.iterdir():
        text = path.read_text()
        versions |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r'rayVersion: "(\d+\.\d+\.\d+)"', text))
    assert len(versions) == 1, f"cluster files disagree on the Ray version: {sorted(versions)}"
