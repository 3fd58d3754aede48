"""`llm-atc plan` and the sizing behind `--accelerator auto`, fully offline.

Model configs are the public config.json files of well-known models (tests/fixtures/model_configs);
prices come from a small catalog in SkyPilot's own CSV format (tests/fixtures/catalog/v8), copied to
where SkyPilot reads its catalog in this session's HOME and parsed by SkyPilot's real catalog code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from support.cli import assert_one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "model_configs"

# Public parameter counts (model cards / safetensors metadata) and sizes.
PUBLIC_PARAMS = {
    "Qwen2.5-0.5B-Instruct": 494_032_768,  # "0.49B"
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-2-13b-hf": 13_015_864_320,
    "Llama-2-70b-hf": 68_976_648_192,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "Meta-Llama-3-8B": 8_030_261_248,
    "DeepSeek-V2-Lite": 15_700_000_000,  # "15.7B"
    "Llama-2-7B-AWQ": 6_738_415_616,
}
MODELS = sorted(PUBLIC_PARAMS)


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.config.json").read_text())


def model_folder(tmp_path: Path, name: str, *, index: bool = True) -> Path:
    """A model folder as a checkpoint has it: config.json (+ model.safetensors.index.json)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(CONFIGS / f"{name}.config.json", folder / "config.json")
    published = CONFIGS / f"{name}.safetensors.index.json"
    if index and published.is_file():
        shutil.copy(published, folder / "model.safetensors.index.json")
    return folder


# ----------------------------------------------------------------------------------------------
# Sizing from config.json


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_the_public_size(name):
    from llm_atc.planning import Architecture

    counts = Architecture.from_config(config(name)).parameter_counts()
    assert sum(counts.values()) == pytest.approx(PUBLIC_PARAMS[name], rel=0.01)


def test_weight_bytes_for_dtype_and_quantization():
    from llm_atc.planning import GIB, estimate_memory

    fp16 = estimate_memory(config("Llama-2-7b-hf"))
    assert fp16.weight_bytes == pytest.approx(13.48e9, rel=0.01) and fp16.dtype == "float16"
    # TheBloke/Llama-2-7B-AWQ ships a 3.89 GB model.safetensors: 4-bit linears + fp16 embeddings/lm_head.
    awq = estimate_memory(config("Llama-2-7B-AWQ"))
    assert awq.quantization == "awq" and awq.weight_bytes == pytest.approx(3.89e9, rel=0.03)
    fp8 = estimate_memory(config("Llama-2-7b-hf"), quantization="fp8")
    assert 6.7e9 < fp8.weight_bytes < 7.1e9  # 1 B per linear weight, embeddings stay 16-bit
    fp32 = estimate_memory(config("Llama-2-7b-hf"), dtype="float32")
    assert fp32.weight_bytes == 2 * fp16.weight_bytes and fp32.kv_cache_bytes == 2 * fp16.kv_cache_bytes
    assert estimate_memory(config("Mixtral-8x7B-v0.1")).weight_bytes / GIB == pytest.approx(87.0, rel=0.01)


def test_safetensors_index_gives_the_parameter_count(tmp_path):
    from llm_atc.planning import estimate_memory, load_model_info

    for name in ("Llama-2-7b-hf", "Mixtral-8x7B-v0.1", "Meta-Llama-3-8B"):
        info = load_model_info(str(model_folder(tmp_path, name)))
        assert info.index_total_size and info.source.startswith("folder ")
        estimate = estimate_memory(info)
        assert estimate.params_source == "safetensors index"
        assert estimate.params == info.index_total_size // 2
        assert estimate.params == pytest.approx(estimate.params_from_config, rel=0.001)


def test_quantized_checkpoint_is_sized_from_its_index():
    from llm_atc.planning import ModelInfo, estimate_memory

    info = ModelInfo.from_config(config("Llama-2-7B-AWQ"), index_total_size=3_893_000_000)
    estimate = estimate_memory(info)
    assert estimate.weight_bytes == 3_893_000_000 and estimate.params_source == "config"


def test_kv_cache_per_token_minds_gqa_sliding_windows_and_mla():
    from llm_atc.planning import estimate_memory

    llama2 = estimate_memory(config("Llama-2-7b-hf"))  # 32 layers x 32 KV heads x 128 x 2 x 2 B
    assert llama2.kv_bytes_per_token == 512 * 1024 and llama2.max_model_len == 4096
    assert llama2.kv_cache_bytes == 4096 * 512 * 1024
    llama3 = estimate_memory(config("Meta-Llama-3-8B"))  # GQA: 8 KV heads
    assert llama3.kv_bytes_per_token == 128 * 1024 and llama3.max_model_len == 8192
    mistral = estimate_memory(config("Mistral-7B-v0.1"))  # 32768 positions, a 4096-token window
    assert mistral.max_model_len == 32768
    assert mistral.kv_cache_bytes == 4096 * mistral.kv_bytes_per_token
    assert "window" in mistral.kv_formula()
    qwen = estimate_memory(config("Qwen2.5-0.5B-Instruct"))  # sliding_window set, use_sliding_window false
    assert qwen.kv_bytes_per_token == 24 * 2 * 64 * 2 * 2
    assert qwen.kv_cache_bytes == 32768 * qwen.kv_bytes_per_token
    deepseek = estimate_memory(config("DeepSeek-V2-Lite"))  # MLA: kv_lora_rank + rope dims, no K/V split
    assert deepseek.kv_bytes_per_token == 27 * (512 + 64) * 2
    assert deepseek.max_model_len == 32768  # 163840 positions, capped
    assert estimate_memory(config("Llama-2-7b-hf"), max_model_len=1024).kv_cache_bytes == 1024 * 512 * 1024


@pytest.mark.parametrize(
    "name, gpu_gib, count, fits",
    [
        ("Llama-2-70b-hf", 80, 1, False),  # fp16 weights alone are 128 GiB
        ("Llama-2-70b-hf", 80, 2, True),
        ("Mixtral-8x7B-v0.1", 80, 1, False),  # 87 GiB of fp16 weights
        ("Mixtral-8x7B-v0.1", 80, 2, True),
        ("Qwen2.5-0.5B-Instruct", 15, 1, True),  # T4 (AWS reports 15360 MiB)
        ("Qwen2.5-0.5B-Instruct", 22.35, 1, True),  # L4
        ("Llama-2-7b-hf", 22.35, 1, True),  # L4: 12.6 GiB + 2 GiB KV + runtime
        ("Llama-2-7b-hf", 15, 1, False),  # T4
        ("Llama-2-7B-AWQ", 15, 1, True),
        ("Llama-2-13b-hf", 24, 1, False),  # A10G
        ("Llama-2-13b-hf", 40, 1, True),  # A100 40GB
        ("Meta-Llama-3-8B", 22.35, 1, True),
    ],
)
def test_known_serving_deployments(name, gpu_gib, count, fits):
    from llm_atc.planning import estimate_memory

    fit = estimate_memory(config(name)).fit(gpu_gib, count)
    assert fit.ok is fits, fit


def test_tensor_parallel_must_divide_the_heads():
    from llm_atc.planning import estimate_memory

    qwen = estimate_memory(config("Qwen2.5-0.5B-Instruct"))  # 14 heads, 2 KV heads
    assert qwen.fit(15, 2).ok
    fit = qwen.fit(80, 4)
    assert not fit.ok and "14 attention heads" in fit.reason
    assert "power of two" in estimate_memory(config("Llama-2-7b-hf")).fit(80, 3).reason


@pytest.mark.parametrize(
    "name, mode, gpu_gib, count, fits",
    [
        ("Llama-2-7b-hf", "full", 80, 1, True),  # bf16 weights + grads + Adam: 8 B/param = 50 GiB
        ("Llama-2-7b-hf", "full", 40, 1, False),
        ("Llama-2-7b-hf", "full", 40, 2, False),  # FSDP: fp32 state, 16 B/param / 2
        ("Llama-2-7b-hf", "full", 40, 4, True),
        ("Llama-2-7b-hf", "lora", 24, 1, True),
        ("Llama-2-7b-hf", "lora", 15, 1, False),
        ("Llama-2-7b-hf", "qlora", 15, 1, True),
        ("Llama-2-70b-hf", "qlora", 80, 1, True),
        ("Llama-2-70b-hf", "qlora", 48, 1, False),
        ("Llama-2-70b-hf", "lora", 80, 8, False),  # DDP: every GPU holds the 128 GiB base
    ],
)
def test_known_training_setups(name, mode, gpu_gib, count, fits):
    from llm_atc.planning import estimate_memory

    fit = estimate_memory(config(name), mode=mode).fit(gpu_gib, count)
    assert fit.ok is fits, fit


def test_training_terms():
    from llm_atc.planning import estimate_memory

    lora = estimate_memory(config("Llama-2-7b-hf"), mode="lora")
    # r=16 on q, k, v, o, gate, up, down of 32 layers
    assert lora.trainable_params == 16 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert lora.max_model_len == 2048 and lora.batch_size == 4 and lora.activation_bytes > 0
    qlora = estimate_memory(config("Llama-2-7b-hf"), mode="qlora")
    assert qlora.weight_bytes < lora.weight_bytes / 3
    full = estimate_memory(config("Llama-2-7b-hf"), mode="full")
    assert full.need_per_gpu(1) > 8 * full.params > full.need_per_gpu(8)


# ----------------------------------------------------------------------------------------------
# Offers and prices through SkyPilot's catalog code


def test_offers_come_from_skypilots_catalog(catalog):
    from llm_atc.planning import catalog as sky_catalog

    assert sky_catalog.catalog_clouds() == ["aws", "gcp", "lambda"]
    offers = {(o.cloud, o.instance_type): o for o in sky_catalog.list_offers(["aws", "gcp", "lambda"])}
    g6 = offers[("AWS", "g6.xlarge")]
    assert (g6.accelerator, g6.count, g6.price, g6.price_region) == ("L4", 1, 0.8048, "us-east-1")
    assert g6.gpu_memory_gib == pytest.approx(22888 / 1024) and g6.memory_source == "catalog GpuInfo"
    t4 = offers[("AWS", "g4dn.xlarge")]
    assert (t4.price_region, t4.spot_price, t4.spot_region) == ("us-east-1", 0.1865, "us-west-2")
    gcp_l4 = offers[("GCP", "g2-standard-4")]  # GPU + host VM, priced by SkyPilot
    assert gcp_l4.price == pytest.approx(0.56 + 0.147) and gcp_l4.memory_source.startswith("catalog GpuInfo")
    assert offers[("Lambda", "gpu_1x_a100_sxm4")].spot_price is None  # Lambda has no spot
    assert offers[("GCP", "a2-ultragpu-2g")].accelerator == "A100-80GB"
    assert "m6i.2xlarge" not in {o.instance_type for o in offers.values()}


def test_store_credentials_do_not_outlive_a_catalog_read(catalog, s3, monkeypatch):
    """AWS's catalog maps zones per account, so reading it looks up who the credentials belong to. A read
    made while `--envs` store settings (here moto's) are in the environment must not leave that identity
    behind: a later read without them would fetch every region's zones as that account (in CI: for
    many minutes, against the metadata server)."""
    from sky import exceptions
    from sky.clouds import AWS

    from llm_atc.planning import catalog as sky_catalog

    assert sky_catalog.list_offers(["aws"])  # as moto's account
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(exceptions.CloudUserIdentityError):
        AWS.get_active_user_identity()


def test_memory_falls_back_to_metadata_then_gpu_names(catalog):
    from llm_atc.planning import catalog as sky_catalog

    gcp = {o.accelerator: o for o in sky_catalog.list_offers(["gcp"])}  # GCP rows carry no GpuInfo
    assert (gcp["L4"].gpu_memory_gib, gcp["L4"].memory_source) == (
        pytest.approx(22888 / 1024),
        "catalog GpuInfo (another cloud)",
    )  # AWS's catalog, on disk
    assert gcp["T4"].gpu_memory_gib == 15  # AWS reports 15360 MiB
    metadata = catalog / "common" / "metadata.csv"
    saved = metadata.read_text()
    aws, lam = catalog / "aws", catalog / "lambda"
    aws.rename(catalog / "aws.off")
    lam.rename(catalog / "lambda.off")
    try:
        gcp = {o.accelerator: o for o in sky_catalog.list_offers(["gcp"])}
        assert (gcp["T4"].gpu_memory_gib, gcp["T4"].memory_source) == (16, "catalog metadata.csv")
        metadata.write_text("GPU,MemoryGB,Manufacturer\n")
        gcp = {o.accelerator: o for o in sky_catalog.list_offers(["gcp"])}
    finally:
        metadata.write_text(saved)
        (catalog / "aws.off").rename(aws)
        (catalog / "lambda.off").rename(lam)
    assert (gcp["A100"].gpu_memory_gib, gcp["A100"].memory_source) == (40, "sky.utils.gpu_names")
    assert (gcp["A100-80GB"].gpu_memory_gib, gcp["A100-80GB"].memory_source) == (80, "sky.utils.gpu_names")
    assert gcp["L4"].gpu_memory_gib is None  # no source knows it: the plan skips it, with a reason


@pytest.mark.parametrize(
    "name, use_spot, expected",
    [
        ("Qwen2.5-0.5B-Instruct", False, ("T4:1", "AWS", "g4dn.xlarge", 0.526)),
        ("Qwen2.5-0.5B-Instruct", True, ("T4:1", "AWS", "g4dn.xlarge", 0.1865)),
        ("Llama-2-7b-hf", False, ("L4:1", "GCP", "g2-standard-4", 0.707)),
        ("Llama-2-13b-hf", False, ("A6000:1", "Lambda", "gpu_1x_a6000", 0.80)),
        ("Llama-2-70b-hf", False, ("A6000:4", "Lambda", "gpu_4x_a6000", 3.20)),
        ("Mixtral-8x7B-v0.1", False, ("A6000:4", "Lambda", "gpu_4x_a6000", 3.20)),
        ("Mixtral-8x7B-v0.1", True, ("T4:8", "AWS", "g4dn.metal", 2.87)),  # spot in us-west-2
    ],
)
def test_cheapest_plan(catalog, name, use_spot, expected):
    from llm_atc.planning import make_plan

    plan = make_plan(config(name), use_spot=use_spot)
    best = plan.best
    assert (best.accelerators, best.offer.cloud, best.offer.instance_type) == expected[:3]
    assert best.hourly == pytest.approx(expected[3]) and best.nodes == 1
    assert plan.auto[0] == expected[0]
    assert len(plan.auto) == len({a.split(":")[0] for a in plan.auto})  # one count per GPU type


def _brute_force(estimate, listing: dict, use_spot: bool) -> float:
    """The cheapest raw catalog row that fits, every count tried (the benchmark's oracle)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_costs.py"
    module_spec = importlib.util.spec_from_file_location("llm_atc_plan_costs", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.brute_force(estimate, listing, use_spot)[0]


@pytest.mark.parametrize("use_spot", [False, True])
def test_plan_matches_brute_force(catalog, use_spot):
    from sky import catalog as sky_catalog

    from llm_atc.planning import estimate_memory, plan_offers
    from llm_atc.planning.catalog import list_offers

    clouds = ["aws", "gcp", "lambda"]
    listing = sky_catalog.list_accelerators(gpus_only=True, clouds=clouds, all_regions=True)
    offers = list_offers(clouds)
    checked = 0
    for name in MODELS:
        for mode in ("serve", "full", "lora", "qlora") if "AWQ" not in name else ("serve",):
            for max_model_len in (None, 1024):
                estimate = estimate_memory(config(name), mode=mode, max_model_len=max_model_len)
                options, _ = plan_offers(estimate, offers, use_spot=use_spot, max_nodes=1)
                expected = _brute_force(estimate, listing, use_spot)
                if math.isinf(expected):
                    assert options == [], (name, mode)
                    continue
                assert options[0].hourly == pytest.approx(expected), (name, mode, options[0])
                assert [o.hourly for o in options] == sorted(o.hourly for o in options)
                checked += 1
    assert checked > 50


def test_cloud_and_region_filters(catalog):
    from llm_atc.planning import make_plan

    plan = make_plan(config("Llama-2-7b-hf"), cloud="aws", region="us-west-2")
    assert plan.clouds == ["aws"] and {o.offer.cloud for o in plan.options} == {"AWS"}
    assert (plan.best.accelerators, plan.best.hourly, plan.best.region) == ("L4:1", 0.8853, "us-west-2")
    assert make_plan(config("Llama-2-7b-hf"), cloud="lambda").auto == [
        "A10:1",
        "A6000:1",
        "A100:1",
        "H100:1",
        "A100-80GB:8",
    ]


def test_past_one_node_plans_pipeline_stages(catalog):
    from llm_atc.planning import make_plan

    plan = make_plan(config("Llama-2-70b-hf"), mode="full")  # 1.1 TB of fp32 training state
    assert plan.num_nodes > 1 and all(o.count == 8 for o in plan.options)
    assert plan.best.need_bytes <= plan.best.usable_bytes
    single = make_plan(config("Llama-2-70b-hf"), mode="full", max_nodes=1)
    assert single.options == [] and "A100-80GB" in single.infeasible


def feasible(model, **options) -> list[str]:
    """What `--accelerator auto` offers SkyPilot on one node, cheapest first."""
    from llm_atc.planning import auto_accelerators

    return list(auto_accelerators(model, max_nodes=1, **options).accelerators)


def test_feasible_accelerators_for_accelerator_auto(catalog, tmp_path):
    from llm_atc.errors import UserError
    from llm_atc.planning import auto_accelerators

    assert feasible(str(model_folder(tmp_path, "Qwen2.5-0.5B-Instruct")))[:3] == ["T4:1", "L4:1", "A10:1"]
    assert feasible(config("Llama-2-70b-hf"), cloud="gcp") == ["L4:8", "A100-80GB:2", "A100:4", "H100:8"]
    choice = auto_accelerators(config("Mistral-7B-v0.1"), use_spot=True)
    assert choice.num_nodes == 1 and choice.max_model_len == 32768
    assert choice.accelerator_text == ",".join(choice.accelerators) and choice.accelerators[0] == "L4:1"
    full = auto_accelerators(config("Llama-2-70b-hf"), mode="full", max_nodes=8)
    assert full.num_nodes > 1
    with pytest.raises(UserError) as error:
        feasible(config("Llama-2-70b-hf"), cloud="lambda", mode="lora")
    assert "no GPU" in str(error.value) and "\n" not in str(error.value)


def test_adapter_checkpoint_is_sized_on_its_base(tmp_path, catalog):
    from llm_atc.planning import make_plan

    base = model_folder(tmp_path, "Llama-2-7b-hf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 16}))
    plan = make_plan(str(adapter))
    assert plan.model.adapter_of == str(base) and plan.best.accelerators == "L4:1"


def test_bucket_run_reads_config_through_the_object_store(s3, catalog):
    from llm_atc.planning import load_model_info

    s3.create_bucket(Bucket="plans")
    s3.put_object(
        Bucket="plans", Key="llm-atc/r1/config.json", Body=(CONFIGS / "Mixtral-8x7B-v0.1.config.json").read_bytes()
    )
    s3.put_object(
        Bucket="plans",
        Key="llm-atc/r1/model.safetensors.index.json",
        Body=(CONFIGS / "Mixtral-8x7B-v0.1.safetensors.index.json").read_bytes(),
    )
    info = load_model_info("llm-atc/r1", source="s3://plans/llm-atc/r1")
    assert info.source == "s3://plans/llm-atc/r1" and info.index_total_size == 93405585408
    s3.put_object(
        Bucket="plans",
        Key="llm-atc/ad/adapter_config.json",
        Body=json.dumps({"base_model_name_or_path": "no-org/no-such-base"}).encode(),
    )
    from llm_atc.errors import UserError

    with pytest.raises(UserError, match="cannot read config for no-org/no-such-base"):
        load_model_info("llm-atc/ad", source="s3://plans/llm-atc/ad")


# ----------------------------------------------------------------------------------------------
# The command


def test_plan_json(cli, catalog, tmp_path):
    folder = model_folder(tmp_path, "Llama-2-70b-hf")
    result = cli("plan", "--name", str(folder), "--json")
    assert result.exit_code == 0, result
    plan = json.loads(result.stdout)
    assert plan["model"] == str(folder) and plan["mode"] == "serve" and plan["clouds"] == ["aws", "gcp", "lambda"]
    terms = plan["terms"]
    assert terms["params"] == pytest.approx(68.98e9, rel=0.001) and terms["params_source"] == "config"
    assert terms["kv_bytes_per_token"] == 80 * 8 * 128 * 2 * 2 and terms["max_model_len"] == 4096
    assert terms["gpu_memory_utilization"] == 0.9 and terms["weight_bytes"] == 2 * terms["params"]
    first = plan["options"][0]
    assert set(first) >= {
        "accelerators",
        "count",
        "nodes",
        "tensor_parallel",
        "cloud",
        "instance_type",
        "region",
        "gpu_memory_gib",
        "need_per_gpu_gib",
        "usable_per_gpu_gib",
        "hourly",
        "price",
        "spot_price",
    }
    assert first["accelerators"] == plan["auto"][0] == "A6000:4" and first["hourly"] == 3.2
    assert [o["hourly"] for o in plan["options"] if o["nodes"] == 1] == sorted(
        o["hourly"] for o in plan["options"] if o["nodes"] == 1
    )
    assert plan["infeasible"] == [  # Lambda's A10 comes one per node only
        {"accelerator": "A10", "reason": "1 x 24 GiB: needs 131.2 GiB per GPU, 21.6 GiB usable"}
    ]
    assert plan["num_nodes"] == 1 and result.stderr == ""


def test_plan_table(cli, catalog, tmp_path):
    result = cli("plan", "--name", str(model_folder(tmp_path, "Mixtral-8x7B-v0.1")), "--mode", "qlora", "--use_spot")
    assert result.exit_code == 0, result
    for text in ("Parameters", "46.70B (safetensors index", "Activations", "SPOT $/H", "--accelerator auto: "):
        assert text in result.stdout, result


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--name", "./no-such-folder"), ("no such folder",)),
        (
            ("--name", "llm-atc-tests/no-such-model"),
            ("cannot read config for llm-atc-tests/no-such-model", "pass HF_TOKEN or a local folder"),
        ),
        (("--name", "{folder}", "--quantization", "int3"), ("--quantization 'int3'",)),
        (("--name", "{folder}", "--region", "us-east-1"), ("--region needs --cloud",)),
        (
            ("--name", "{folder}", "--mode", "full", "--quantization", "awq"),
            ("--quantization applies to --mode serve",),
        ),
        (("--name", "{folder}", "--max_model_len", "0"), ("--max_model_len 0",)),
        (("--name", "{folder}", "--mode", "lora", "--dtype", "float32"), ("--dtype applies to --mode serve",)),
        (("--name", "{folder}", "--dtype", "fp4"), ("--dtype 'fp4'",)),
    ],
)
def test_one_line_errors(cli, tmp_path, args, fragments):
    folder = model_folder(tmp_path, "Llama-2-7b-hf")
    result = cli("plan", *(a.format(folder=folder) for a in args))
    assert_one_line_error(result, *fragments)


def test_config_without_the_needed_fields(cli, tmp_path):
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 224, "hidden_size": 768}))
    result = cli("plan", "--name", str(folder))
    assert_one_line_error(result, "lacks num_hidden_layers, num_attention_heads, vocab_size")
    (folder / "config.json").write_text("{not json")
    assert_one_line_error(cli("plan", "--name", str(folder)), "config.json is not valid JSON")


def test_awq_checkpoint_cannot_be_fine_tuned(cli, tmp_path):
    result = cli("plan", "--name", str(model_folder(tmp_path, "Llama-2-7B-AWQ")), "--mode", "lora")
    assert_one_line_error(result, "is a awq checkpoint")


def test_serve_accelerator_auto_renders_only_what_fits(cli, catalog, tmp_path):
    """`serve --accelerator auto --dryrun`: SkyPilot gets the feasible set as any_of, cheapest first."""
    import copy
    import shlex

    import yaml

    from llm_atc.sky_sdk import import_sky

    folder = model_folder(tmp_path, "Llama-2-70b-hf")
    result = cli("serve", "--name", str(folder), "--accelerator", "auto", "--cloud", "gcp", "--dryrun")
    assert result.exit_code == 0, result
    config = yaml.safe_load(result.stdout)
    expected = feasible(str(folder), cloud="gcp")
    assert [a["accelerators"] for a in config["resources"]["any_of"]] == expected
    assert "A100:1" not in expected and "A100-80GB:1" not in expected  # 70B fp16 does not fit on one
    command = shlex.split(config["envs"]["VLLM_COMMAND"])
    assert command[command.index("--max-model-len") + 1] == "4096"  # what the plan was sized for
    task = import_sky().Task.from_yaml_config(copy.deepcopy(config))
    assert len(task.resources) == len(expected)
    assert "--accelerator auto:" in result.stderr


def test_train_accelerator_auto_accounts_for_the_mode(catalog, tmp_path):
    from llm_atc.app.train import train_spec

    data = tmp_path / "d.json"
    data.write_text("[]")
    base = model_folder(tmp_path, "Llama-2-7b-hf")
    qlora = train_spec(
        model_type="qlora",
        finetune_data=str(data),
        checkpoint_bucket="bkt",
        checkpoint_store="S3",
        base_model=str(base),
        accelerator="auto",
        cloud="aws",
    )
    full = train_spec(
        model_type="vicuna",
        finetune_data=str(data),
        checkpoint_bucket="bkt",
        checkpoint_store="S3",
        base_model=str(base),
        accelerator="auto",
        cloud="aws",
    )
    cheapest_qlora, cheapest_full = qlora.placement.accelerators[0], full.placement.accelerators[0]
    assert cheapest_qlora.count == 1
    assert (cheapest_full.count * full.num_nodes) > 1  # a full fine-tune of 7B needs more than one GPU
