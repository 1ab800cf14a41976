"""Students of any shape (models/students.py): each kind builds what it says, counts without allocating,
and each bad shape is one line naming its field."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, Qwen2Config

from raydistill.config import StudentConfig
from raydistill.errors import ConfigError
from raydistill.models.loading import count_parameters
from raydistill.models.sizes import STUDENT_SIZES, build_llama, swiglu_width
from raydistill.models.students import (
    build_student,
    check_student_spec,
    kept_layers,
    student_config,
    student_config_sha256,
    student_name,
    student_parameters,
)

VOCAB = 300
SHAPES = {  # family -> an explicit shape of it, with grouped-query attention where it has some
    "llama": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2},
    "qwen2": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 96},
    "mistral": {"hidden": 48, "layers": 3, "heads": 4, "kv_heads": 1, "tied": False},
    "gemma": {"hidden": 64, "layers": 2, "heads": 2, "max_positions": 128},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A 4-layer Llama teacher (untied, so lm_head is its own weight) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("teacher")
    build_llama(vocab_size=VOCAB, hidden=64, layers=4, heads=4, max_positions=256, tie_embeddings=False,
                seed=7).save_pretrained(path)
    return str(path)


def _config_dir(tmp_path, **settings) -> str:
    Qwen2Config(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": 128,
                   **settings}).save_pretrained(tmp_path)
    return str(tmp_path)


def _packed_inputs(segments: list[int]) -> dict[str, torch.Tensor]:
    """One packed row as the trainer feeds it: positions restart in every piece, and the 4D mask is causal
    within a piece only (``PackedBatch.attention_mask``)."""
    segment_ids = torch.tensor([[i for i, n in enumerate(segments) for _ in range(n)]])
    position_ids = torch.cat([torch.arange(n) for n in segments])[None]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    return {"input_ids": torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0)),
            "position_ids": position_ids, "attention_mask": mask}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# --- named sizes ------------------------------------------------------------------------------


def test_a_named_size_is_the_ladders_llama_and_a_string_is_short_for_it():
    assert StudentConfig.model_validate("small") == StudentConfig(size="small")
    assert StudentConfig() == StudentConfig(size="tiny")  # a student that sets nothing
    model = build_student("micro", VOCAB, seed=3)
    assert _same_weights(model, build_llama(vocab_size=VOCAB, seed=3, **STUDENT_SIZES["micro"]))
    assert model.config.max_position_embeddings == 512 and model.config.bos_token_id is None
    longer = student_config({"size": "micro", "max_positions": 2048}, VOCAB)
    assert longer.max_position_embeddings == 2048


# --- explicit shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_an_explicit_shape_builds_as_asked_and_runs_packed_batches(family):
    shape = SHAPES[family]
    spec = StudentConfig(family=family, **shape)
    model = build_student(spec, VOCAB, seed=1).eval()
    c = model.config
    assert c.model_type == family and c.vocab_size == VOCAB
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (shape["hidden"], shape["layers"],
                                                                          shape["heads"])
    assert c.num_key_value_heads == shape.get("kv_heads", shape["heads"])
    assert c.intermediate_size == shape.get("intermediate", swiglu_width(shape["hidden"]))
    assert c.max_position_embeddings == shape.get("max_positions", 512)
    assert c.tie_word_embeddings is shape.get("tied", True)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is shape.get("tied", True)
    assert getattr(c, "head_dim", shape["hidden"] // shape["heads"]) == shape["hidden"] // shape["heads"]
    assert next(model.parameters()).dtype == torch.float32 and c._attn_implementation == "sdpa"

    packed = _packed_inputs([5, 7])
    with torch.no_grad():
        logits = model(**packed).logits
        alone = model(input_ids=packed["input_ids"][:, 5:]).logits  # the second piece by itself
        float_mask = torch.zeros(packed["attention_mask"].shape).masked_fill(~packed["attention_mask"], -1e9)
        with_float_mask = model(**{**packed, "attention_mask": float_mask}).logits
    assert logits.shape == (1, 12, VOCAB) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, 5:], alone, rtol=0, atol=1e-5)  # no attention across pieces
    torch.testing.assert_close(with_float_mask, logits, rtol=0, atol=1e-5)

    assert _same_weights(build_student(spec, VOCAB, seed=1), model)
    assert not _same_weights(build_student(spec, VOCAB, seed=2), model)


def test_gemma_gets_hidden_over_heads_as_head_dim_not_its_default_256():
    assert AutoConfig.for_model("gemma").head_dim == 256
    assert student_config({"family": "gemma", "hidden": 64, "layers": 1, "heads": 4}, VOCAB).head_dim == 16


def test_a_family_without_a_key_leaves_unasked_defaults_out_and_refuses_asked_ones():
    config = student_config({"family": "gpt2", "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4}, VOCAB)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 2, 4, 512)
    with pytest.raises(ConfigError, match=r"^student\.kv_heads 2: a gpt2 config has no num_key_value_heads"):
        student_config({"family": "gpt2", "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}, VOCAB)
    with pytest.raises(ConfigError, match=r"^student\.intermediate 100: a gpt2 config has no intermediate_size"):
        student_config({"family": "gpt2", "hidden": 64, "layers": 2, "heads": 4, "intermediate": 100}, VOCAB)


# --- config directories and pretrained models ------------------------------------------------------


def test_a_config_directory_is_built_at_random_from_its_config(tmp_path):
    spec = StudentConfig(config=_config_dir(tmp_path))
    model = build_student(spec, VOCAB - 10, seed=0)  # the directory's own vocab_size, which covers the data's
    assert (model.config.model_type, model.config.hidden_size, model.config.num_key_value_heads) == ("qwen2", 32, 1)
    assert model.config.vocab_size == VOCAB and next(model.parameters()).dtype == torch.float32
    assert _same_weights(build_student(spec, VOCAB, seed=0), model)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_config_directory_is_hashed_so_an_edit_is_another_run(tmp_path):
    spec = StudentConfig(config=_config_dir(tmp_path))
    before = student_config_sha256(spec)
    assert before is not None and student_config_sha256("tiny") is None
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert student_config_sha256(spec) != before


def test_a_pretrained_model_is_loaded_with_its_weights(tmp_path):
    saved = build_llama(vocab_size=VOCAB, hidden=32, layers=1, heads=2, seed=5)
    saved.save_pretrained(tmp_path)
    assert _same_weights(build_student(StudentConfig(model=str(tmp_path)), VOCAB), saved)


# --- fractions of the teacher -------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "depth", "kept"), [
    (4, 0.5, [0, 3]), (5, 0.5, [0, 2, 4]), (4, 0.75, [0, 2, 3]), (10, 0.25, [0, 5, 9]), (4, 0.1, [0]),
    (4, 1.0, [0, 1, 2, 3]), (12, 0.5, [0, 2, 4, 7, 9, 11])])
def test_depth_keeps_evenly_spaced_layers_first_and_last_rounded_half_up(layers, depth, kept):
    assert kept_layers(layers, depth) == kept


def test_a_teacher_fraction_keeps_the_teachers_family_vocabulary_and_head_dim(teacher):
    half_deep = student_config({"teacher_fraction": {"depth": 0.5}}, 10, teacher=teacher)
    assert (half_deep.num_hidden_layers, half_deep.hidden_size, half_deep.num_attention_heads) == (2, 64, 4)
    assert half_deep.vocab_size == VOCAB and half_deep.max_position_embeddings == 256  # the teacher's
    assert half_deep.tie_word_embeddings is False
    narrow = student_config({"teacher_fraction": {"width": 0.5, "teacher": teacher}}, VOCAB)  # its own teacher
    assert (narrow.num_hidden_layers, narrow.num_attention_heads, narrow.num_key_value_heads) == (4, 2, 2)
    assert (narrow.hidden_size, narrow.head_dim, narrow.intermediate_size) == (32, 16, 88)
    model = build_student({"teacher_fraction": {"depth": 0.5}}, VOCAB, seed=0, teacher=teacher)
    source = AutoConfig.from_pretrained(teacher)
    assert model.config.model_type == source.model_type
    assert count_parameters(model) < student_parameters({"model": teacher}, VOCAB)


def test_a_gqa_teachers_fraction_keeps_kv_heads_dividing_heads(tmp_path):
    path = _config_dir(tmp_path, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3)
    narrow = student_config({"teacher_fraction": {"width": 0.5, "depth": 0.34}}, VOCAB, teacher=path)
    assert (narrow.num_attention_heads, narrow.num_key_value_heads, narrow.hidden_size) == (3, 1, 48)
    assert narrow.layer_types == ["full_attention"] and narrow.num_hidden_layers == 1


def test_init_teacher_copies_embeddings_norm_head_and_the_kept_layers(teacher):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(teacher).eval()
    student = build_student({"teacher_fraction": {"depth": 0.5, "init": "teacher"}}, VOCAB, teacher=teacher)
    assert len(student.model.layers) == 2
    for new, old in enumerate([0, 3]):
        assert _same_weights(student.model.layers[new], source.model.layers[old])
    assert torch.equal(student.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, source.model.norm.weight)
    assert torch.equal(student.lm_head.weight, source.lm_head.weight)
    whole = build_student({"teacher_fraction": {"init": "teacher"}}, VOCAB, teacher=teacher).eval()
    packed = _packed_inputs([6, 4])
    with torch.no_grad():  # every layer kept: the teacher itself
        torch.testing.assert_close(whole(**packed).logits, source(**packed).logits, rtol=0, atol=1e-6)


def test_a_gguf_teacher_is_read_through_its_dir_hash_file_name(gguf_teacher, tiny_teacher):
    pytest.importorskip("gguf")
    from support import GGUF_NAME

    name = f"{gguf_teacher}#{GGUF_NAME}"  # how the manifest names a GGUF teacher
    config = student_config({"teacher_fraction": {"depth": 0.5}}, 384, teacher=name)
    assert config.num_hidden_layers == 1 and config.hidden_size == AutoConfig.from_pretrained(tiny_teacher).hidden_size
    copied = build_student({"teacher_fraction": {"depth": 0.5, "init": "teacher"}}, 384, teacher=name)
    source = build_student(StudentConfig(model=tiny_teacher), 384)
    assert torch.equal(copied.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)


# --- counting, names, errors ---------------------------------------------------------------------


def test_parameters_are_counted_without_allocating_and_equal_the_built_count(teacher, tmp_path):
    specs = ["base", {"family": "qwen2", **SHAPES["qwen2"]}, {"family": "mistral", **SHAPES["mistral"]},
             {"config": _config_dir(tmp_path)}, {"teacher_fraction": {"depth": 0.5, "width": 0.5}},
             {"model": teacher}]
    for spec in specs:
        built = count_parameters(build_student(spec, VOCAB, teacher=teacher))
        assert student_parameters(spec, VOCAB, teacher=teacher) == built, spec
    big = {"family": "llama", "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336}
    assert 7.0e9 < student_parameters(big, 128256) < 7.6e9  # Llama-3-8B's shape, tied: counted in no time


def test_names_say_what_a_student_is(tmp_path):
    assert student_name("small") == "small"
    assert student_name({"family": "qwen2", **SHAPES["qwen2"]}) == "qwen2-h64-l2"
    assert student_name({"teacher_fraction": {"depth": 0.5}}) == "teacher-d0.5"
    assert student_name({"teacher_fraction": {"width": 0.25, "init": "random"}}) == "teacher-d1-w0.25"
    assert student_name({"teacher_fraction": {"depth": 0.5, "init": "teacher"}}) == "teacher-d0.5-copy"
    assert student_name({"config": str(tmp_path / "my arch")}) == "my-arch"
    assert student_name({"model": "HuggingFaceTB/SmolLM2-135M"}) == "SmolLM2-135M"


@pytest.mark.parametrize(("spec", "message"), [
    ({"family": "llama", "hidden": 500, "layers": 2, "heads": 8},
     "student.hidden 500 is not divisible by student.heads 8; set hidden to a multiple of heads (e.g. 504)"),
    ({"family": "llama", "hidden": 64, "layers": 2, "heads": 8, "kv_heads": 3},
     "student.heads 8 is not divisible by student.kv_heads 3; set kv_heads to a divisor of heads (e.g. 2)"),
    ({"family": "lama", "hidden": 64, "layers": 2, "heads": 8},
     "student.family 'lama' is not a causal-LM model type of transformers; did you mean llama"),
    ({"family": "vit", "hidden": 64, "layers": 2, "heads": 8}, "student.family 'vit' is not a causal-LM"),
    ("huge", "unknown student size 'huge'; known sizes: micro, tiny, small"),
    ({"teacher_fraction": {"depth": 0.5}}, "student.teacher_fraction needs the teacher: set "
     "student.teacher_fraction.teacher"),
])
def test_a_bad_shape_is_one_line_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        check_student_spec(spec, vocab_size=VOCAB, seq_len=64)
    assert "\n" not in str(err.value)


def test_a_vocabulary_smaller_than_the_datas_is_refused(tmp_path, teacher):
    config = _config_dir(tmp_path / "c", vocab_size=200)
    with pytest.raises(ConfigError, match=re.escape(f"student.config '{config}' has vocab size 200, smaller than the "
                                                    f"{VOCAB} ids of the shard set; set vocab_size >= {VOCAB} in its")):
        check_student_spec({"config": config}, vocab_size=VOCAB, seq_len=64, data="the shard set")
    with pytest.raises(ConfigError, match=rf"^student\.model '{re.escape(teacher)}' has vocab size {VOCAB}, smaller"):
        check_student_spec({"model": teacher}, vocab_size=VOCAB + 1, seq_len=64)
    with pytest.raises(ConfigError, match=r"^student\.teacher_fraction's teacher '.*' has vocab size 300, smaller"):
        check_student_spec({"teacher_fraction": {"teacher": teacher}}, vocab_size=VOCAB + 1, seq_len=64)


def test_positions_below_seq_len_are_refused_for_every_kind(tmp_path, teacher):
    specs = {"size": ({"size": "micro", "max_positions": 64}, "or set student.max_positions >= 100"),
             "shape": ({"family": "qwen2", **SHAPES["qwen2"], "max_positions": 64}, "student.max_positions"),
             "config": ({"config": _config_dir(tmp_path, max_position_embeddings=64)}, "in its config.json"),
             "teacher_fraction": ({"teacher_fraction": {"teacher": teacher}, "max_positions": 64}, "max_positions"),
             "model": ({"model": teacher}, "lower seq_len to <= 256")}
    for kind, (spec, fix) in specs.items():
        seq_len = 300 if kind == "model" else 100
        with pytest.raises(ConfigError, match=rf"^seq_len {seq_len} is longer than the student's \d+ positions"
                                              rf".*{re.escape(fix)}"):
            check_student_spec(spec, vocab_size=VOCAB, seq_len=seq_len)
        assert StudentConfig.model_validate(spec).kind == kind


def test_two_kinds_or_half_a_kind_are_refused_in_one_line():
    from raydistill.config import TrainConfig, build_config

    def train(student) -> None:
        build_config(TrainConfig, {"shards": "s", "output": "o", "student": student}, "for train")

    with pytest.raises(ConfigError, match=r"the student sets student\.size and student\.config: a student is "
                                          r"exactly one of size, a shape"):
        train({"size": "tiny", "config": "c"})
    with pytest.raises(ConfigError, match=r"student\.tied, student\.config and student\.model: a student is"):
        train({"config": "c", "tied": False, "model": "m"})
    with pytest.raises(ConfigError, match=r"a student shape needs family, hidden, layers, heads; set student\.heads"):
        train({"family": "llama", "hidden": 64, "layers": 2})
    with pytest.raises(ConfigError, match=r"init: teacher copies whole layers, so it needs width 1\.0, not 0\.5"):
        train({"teacher_fraction": {"width": 0.5, "init": "teacher"}})
    with pytest.raises(ConfigError, match=r"student\.max_positions is for built students; a student\.model has"):
        train({"model": "m", "max_positions": 1024})
