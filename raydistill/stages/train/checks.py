"""Inputs checked on the driver before any worker starts, so a mismatch is one line, not a worker traceback."""

from __future__ import annotations

import logging

from raydistill.config.jobs import TrainConfig
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io.corpus import check_output_outside, describe
from raydistill.models.students import check_student_spec, student_config
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of
from raydistill.runtime.cluster import cluster_resources_ahead
from raydistill.stages.train.sources import CorpusSource, load_corpus_tokenizer

__all__ = ["check_corpus_fills_a_batch", "check_student", "check_train_inputs"]

log = logging.getLogger(__name__)


def check_train_inputs(cfg: TrainConfig, address: str | None = None) -> None:
    """Refuse, before Ray starts, a run that cannot succeed: in corpus mode an output inside the corpus
    folder (a rerun would read the exported model's JSON files as documents), and workers the cluster
    can never place (``use_gpu: true`` without GPUs, more CPUs than it has): Ray Train would wait for
    them forever. A cluster still to join may grow, so there a shortfall is only logged."""
    if cfg.corpus is not None:
        check_output_outside(cfg.output, cfg.corpus)
    ahead = cluster_resources_ahead(address)
    if ahead is None:
        return
    (resources, fixed), problem = ahead, None
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cfg.use_gpu and gpus == 0:
        problem = "use_gpu=true but the cluster has 0 GPUs; set use_gpu: false (or leave it unset) to run on CPUs"
    elif cfg.use_gpu and cfg.num_workers > gpus:
        problem = (f"num_workers={cfg.num_workers} with use_gpu=true needs {cfg.num_workers} GPUs but the cluster "
                   f"has {gpus:g}; set num_workers <= {int(gpus)}")
    elif cfg.num_workers * cfg.threads_per_worker > cpus:
        problem = (f"num_workers={cfg.num_workers} x threads_per_worker={cfg.threads_per_worker} needs "
                   f"{cfg.num_workers * cfg.threads_per_worker} CPUs but the cluster has {cpus:g}; set num_workers "
                   f"<= {max(1, int(cpus // cfg.threads_per_worker))} or lower threads_per_worker")
    if problem is not None and fixed:
        raise ConfigError(problem)
    if problem is not None:
        log.warning("%s; waiting for the cluster to grow (an autoscaler must add nodes)", problem)


def check_student(cfg: TrainConfig, shard_set: ShardSet | None = None) -> None:
    """Refuse, before any worker starts, a student that cannot be built or cannot use this data.

    Every kind: its shape (each bad one a line naming the field), its vocabulary against the data's ids,
    its positions against seq_len. Shard mode (``shard_set``): a student.model's tokenizer must be the
    teacher's. Corpus mode (``shard_set`` None): a student.model must hold the corpus tokenizer's vocabulary.
    """
    if shard_set is None:
        vocab, teacher, data = vocab_size_of(load_corpus_tokenizer(cfg)), None, f"tokenizer '{cfg.corpus_tokenizer}'"
    else:
        manifest = shard_set.manifest
        vocab, teacher, data = manifest.vocab_size, manifest.teacher.name_or_path, f"the shard set {shard_set.root}"
    if cfg.student.model is not None:  # its contract errors first: they name both tokenizers
        config = student_config(cfg.student, vocab)
        if shard_set is None:
            _check_corpus_student(cfg, config, vocab)
        else:
            _check_shard_student(cfg, config, shard_set)
    check_student_spec(cfg.student, vocab_size=vocab, seq_len=cfg.seq_len, teacher=teacher, data=data)
    if cfg.online_teacher and shard_set is not None:
        try:
            teacher_tok = load_tokenizer(cfg.online_teacher)
        except RaydistillError as err:
            raise ConfigError(f"online_teacher '{cfg.online_teacher}': {err}") from None
        shard_set.check_contract(tokenizer_sha256=tokenizer_sha256(teacher_tok), vocab_size=vocab_size_of(teacher_tok))


def _check_shard_student(cfg: TrainConfig, config, shard_set: ShardSet) -> None:
    """Logit KD compares teacher and student ids one to one: the student needs the teacher's tokenizer."""
    manifest = shard_set.manifest
    if config.vocab_size < manifest.vocab_size:
        raise ContractError(
            f"student vocab size {config.vocab_size} is smaller than the shard set's teacher vocab "
            f"{manifest.vocab_size} ({shard_set.root}); use a student with the teacher's tokenizer"
        )
    try:
        tok = load_tokenizer(cfg.student.model)
    except RaydistillError:
        tok = None
    if tok is not None:
        shard_set.check_contract(tokenizer_sha256=tokenizer_sha256(tok), vocab_size=vocab_size_of(tok),
                                 student=f"student.model '{cfg.student.model}'")


def _check_corpus_student(cfg: TrainConfig, config, vocab: int) -> None:
    """CE on text needs only that the student's embedding covers every id of the corpus tokenizer."""
    if config.vocab_size < vocab:
        raise ContractError(
            f"student.model '{cfg.student.model}' has vocab size {config.vocab_size}, smaller than the {vocab} ids "
            f"of tokenizer '{cfg.corpus_tokenizer}'; use a student built for that tokenizer (or a student.size)"
        )


def check_corpus_fills_a_batch(cfg: TrainConfig) -> None:
    """Tokenize the corpus once on the driver, so an unreadable or too small corpus fails in one line here
    rather than in every worker."""
    source = CorpusSource(cfg)
    if source.num_tokens < cfg.seq_len:
        raise ConfigError(f"corpus {describe(cfg.corpus)} holds {source.num_tokens} tokens "
                          f"({source.num_documents} documents), fewer than one sequence of seq_len {cfg.seq_len}; "
                          "add documents or lower seq_len")
