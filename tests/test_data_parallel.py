"""A sequence-parallel HF model inside PyTorch's data-parallel wrappers, on real gloo ranks.

DDP (DistributedDataParallel) and FSDP2 (fully_shard, per decoder layer and the whole model)
AVERAGE gradients over their ranks, which here are the sequence-parallel ranks; with
sequence_parallel_loss(..., grad_allreduce="mean") the gradients they leave in .grad (DDP: the
all-reduced average; FSDP2: sharded DTensors, gathered to compare) must equal the single-process
model's on the full sequence (fp32; tolerance as in test_huggingface: rank-summed partial
gradients differ by rounding only). Gradients, not parameters after an optimizer step, are
compared: a step of 1e-4 on a norm weight of 1.0 keeps only ~3 significant digits in fp32.
Also checked: the wrapper's forward logits equal the single-process model's, per shard.
"""
import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
import test_huggingface as th  # noqa: E402

import ringattn.integrations.huggingface as rhf  # noqa: E402

def _reference_grads(model, batches):
    """Single-process gradients of the mean of the batches' causal-LM losses (and the logits)."""
    ref = copy.deepcopy(model)
    outs = [ref(input_ids=i, labels=lb) for i, lb in batches]
    (sum(o.loss for o in outs) / len(outs)).backward()
    return [o.logits.detach() for o in outs], {n: p.grad for n, p in ref.named_parameters()}


def _wrap(model, wrapper, world):
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _grad_error(model, ref_grads) -> float:
    """Largest |grad - reference| relative to each tensor's largest reference entry."""
    worst = 0.0
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item())
    return worst


def _step(wrapper, algorithm, layout, seq_len):
    model = th.tiny_model("llama")
    input_ids, labels = th.global_batch(seq_len)
    (ref_logits,), ref_grads = _reference_grads(model, [(input_ids, labels)])
    rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout)
    plan = model.ringattn_plan
    run = _wrap(model, wrapper, dist.get_world_size())
    batch = rhf.shard_batch(plan, input_ids, labels)
    logits = run(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    rhf.sequence_parallel_loss(logits, batch["labels"], grad_allreduce="mean").backward()
    return {(wrapper, algorithm, layout): {
        "logits": (logits.detach() - plan.shard(ref_logits, dim=1)).abs().max().item(),
        "grad": _grad_error(model, ref_grads)}}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_one_step_inside_ddp_and_fsdp2_equals_single_process(dist_pool, wrapper, world):
    results = dist_pool(world).run(_step, wrapper, "auto", "zigzag", th.SEQ[world], timeout=180)
    th.assert_close(results)


def _step_dp_x_sp(wrapper):
    """W = 4 as 2 data-parallel replicas x 2 sequence-parallel ranks: SP groups {0,1} and {2,3},
    each holding its own batch. The DP wrapper averages over all 4 ranks; sequence_parallel_loss
    (group=the SP group, grad_allreduce="mean") scales by the SP group's size, so the result is
    the SUM over each SP group's shards AVERAGED over the two batches: the single-process
    gradient of the mean of the two batches' losses."""
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sp_group, replica = groups[rank // 2], rank // 2
    model = th.tiny_model("llama")
    batches = [th.global_batch(23, seed=1 + r) for r in range(2)]
    ref_logits, ref_grads = _reference_grads(model, batches)
    rhf.apply_sequence_parallel(model, group=sp_group, algorithm="auto", layout="zigzag")
    plan = model.ringattn_plan
    run = _wrap(model, wrapper, 4)
    input_ids, labels = batches[replica]
    batch = rhf.shard_batch(plan, input_ids, labels)
    logits = run(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    rhf.sequence_parallel_loss(logits, batch["labels"], group=sp_group, grad_allreduce="mean").backward()
    return {(wrapper, "dp2 x sp2"): {
        "logits": (logits.detach() - plan.shard(ref_logits[replica], dim=1)).abs().max().item(),
        "grad": _grad_error(model, ref_grads)}}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_replicas_of_sequence_parallel_groups(dist_pool, wrapper):
    th.assert_close(dist_pool(4).run(_step_dp_x_sp, wrapper, timeout=180))
