"""Distributed data parallel on CPU (gloo, 2 processes).

1. Plain DDP (torch.multiprocessing spawn): after a few steps the intervention parameters are
   identical on both ranks and equal to single-process training on the same global batch.
2. HF Trainer under torchrun and under ``accelerate launch`` (DDP): ranks end identical, one
   checkpoint is written.
3. FSDP2 (``fully_shard``) in a plain training loop: same weights as one process, saved from rank 0.
   (HF Trainer's own FSDP path refuses a CPU-only run: "Using fsdp only works in distributed
   training", transformers 5.24 with accelerate 1.16.)
"""
import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reft_kernels as rk
from reft_kernels.base_models.tiny import tiny_llama

VOCAB, D, R, STEPS, GLOBAL_BATCH, SEQ = 64, 32, 4, 3, 8, 12
# A collective that never completes must fail the test, not stall CI: gloo's own default is 30 min.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
RANKS_DEADLINE_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def _run_ranks(worker, out, world=2):
    """mp.spawn with a deadline: a hung rank is killed and the test fails, naming the worker."""
    ctx = mp.start_processes(worker, args=(world, _free_port(), out), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + RANKS_DEADLINE_S
    while not ctx.join(timeout=5):             # raises if a rank raised
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{worker.__name__}: the {world} ranks did not finish within {RANKS_DEADLINE_S}s "
                        "(a collective hung); they were killed")


def _model():
    model = tiny_llama(VOCAB, hidden_size=D, num_layers=2, num_heads=2, seed=0)
    torch.manual_seed(0)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": R,
             "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)}
            for i in (0, 1)]
    return rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")


def _global_batch():
    """Fixed-length rows with the same number of label tokens, so the mean of the two ranks'
    mean losses is the global mean loss (what DDP's gradient averaging computes)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    locs = torch.tensor([[0, 1], [3, 4]]).expand(GLOBAL_BATCH, 2, 2).contiguous()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "intervention_locations": locs}


def _train(model, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_worker(rank, world, port, out):
    torch.set_num_threads(1)
    _init_gloo(rank, world, port)
    try:
        reft = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(reft)
        full = _global_batch()
        per = GLOBAL_BATCH // world
        local = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        _train(ddp, [local] * STEPS)
        torch.save({k: v.detach().clone() for k, v in reft.interventions.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_on_the_global_batch(tmp_path):
    _run_ranks(_ddp_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    single = _model()
    init = {k: v.clone() for k, v in single.interventions.state_dict().items()}
    _train(single, [_global_batch()] * STEPS)
    ref = single.interventions.state_dict()
    trained = dict(single.interventions.named_parameters())        # (buffers stay fixed)
    assert r0.keys() == r1.keys() == ref.keys()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k                        # ranks agree exactly
        torch.testing.assert_close(r0[k], ref[k], atol=2e-6, rtol=1e-5, msg=k)   # = one big batch
        assert k not in trained or not torch.equal(ref[k], init[k]), k   # and training changed it


TRAINER_SCRIPT = textwrap.dedent('''
    import os, sys, torch, transformers
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    sys.path.insert(0, os.environ["REFT_TEST_ROOT"])
    import reft_kernels as rk
    from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
    from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama
    from reft_kernels.data.datasets import make_multiple_position_supervised_data_module
    from reft_kernels.training.trainer import ReftTrainerForCausalLM
    out = sys.argv[1]
    rows = load_builtin_instructions()[:16]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    outputs = [r["output"] for r in rows]
    tok = build_word_tokenizer(prompts + outputs)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0)
    torch.manual_seed(0)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": 4,
             "intervention": rk.LoreftIntervention(embed_dim=32, low_rank_dimension=4, dtype=torch.float32)}
            for i in (0, 1, 0, 1)]
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")
    dm = make_multiple_position_supervised_data_module(tok, model, prompts, outputs, positions="f2+l2",
                                                       num_interventions=4)
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, use_cpu=True, ddp_backend="gloo", ddp_timeout=120,
                                          report_to=[], save_strategy="steps", save_steps=3, logging_steps=1,
                                          disable_tqdm=True)
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args, **dm)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    assert trainer.args.world_size == 2, trainer.args.world_size
    torch.save(reft.interventions.state_dict(), os.path.join(out, f"trainer_rank{rank}.pt"))
    # leave no gloo thread to the interpreter's exit ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"],
    # accelerate's CPU multi-process path (--cpu) needs MPI; --multi_gpu goes through torchrun and,
    # with use_cpu=True in TrainingArguments, trains on the CPU over gloo.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                   "--mixed_precision=no", "--dynamo_backend=no", "--main_process_ip=127.0.0.1"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_hf_trainer_under_a_launcher(tmp_path, launcher):
    script = tmp_path / "train_ddp.py"
    script.write_text(TRAINER_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "REFT_TEST_ROOT": root, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    port_flag = "--master_port" if launcher == "torchrun" else "--main_process_port"
    cmd = [sys.executable, *LAUNCHERS[launcher], f"{port_flag}={_free_port()}", str(script), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "out" / "trainer_rank0.pt")
    r1 = torch.load(tmp_path / "out" / "trainer_rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert (tmp_path / "out" / "checkpoint-3" / "intervenable_model" / "adapter.safetensors").exists()


def _fsdp_worker(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    _init_gloo(rank, world, port)
    try:
        reft = _model()
        for layer in reft.model.model.layers:
            fully_shard(layer)
        fully_shard(reft)            # the interventions are sharded with the root
        full = _global_batch()
        per = GLOBAL_BATCH // world
        _train(reft, [{k: v[rank * per:(rank + 1) * per] for k, v in full.items()}] * STEPS)
        reft.unshard()               # collective: gather the ReFT weights, then save from rank 0
        if rank == 0:
            reft.save(os.path.join(out, "fsdp_adapter"))
        reft.reshard()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_matches_single_process_and_saves(tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: same weights as one process on the global batch."""
    _run_ranks(_fsdp_worker, str(tmp_path))
    single = _model()
    _train(single, [_global_batch()] * STEPS)
    loaded = rk.ReftModel.load(str(tmp_path / "fsdp_adapter"), tiny_llama(VOCAB, hidden_size=D, num_layers=2,
                                                                           num_heads=2, seed=0), backend="torch")
    ref, got = single.interventions.state_dict(), loaded.interventions.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-6, rtol=1e-5, msg=k)
