"""A sequence-parallel HF model inside PyTorch's data-parallel wrappers, on real gloo ranks.

DDP (DistributedDataParallel) and FSDP2 (fully_shard, per decoder layer and the whole model)
AVERAGE gradients over their ranks, which here are the sequence-parallel ranks; with
sequence_parallel_loss(..., grad_allreduce="mean") one SGD step must leave exactly the
parameters the single-process model gets from the same step on the full sequence (fp32;
tolerance as in test_huggingface: rank-summed partial gradients differ by rounding only).
Also checked: the wrapper's forward logits equal the single-process model's, per shard.
"""
import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
import test_huggingface as th  # noqa: E402

import ringattn.integrations.huggingface as rhf  # noqa: E402

LR = 0.5  # large on purpose: the parameter change is then far above rounding


def _sgd_reference(model, input_ids, labels):
    ref = copy.deepcopy(model)
    out = ref(input_ids=input_ids, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    return out.logits.detach(), {n: p.detach().clone() for n, p in ref.named_parameters()}


def _step(wrapper, algorithm, layout, seq_len):
    model = th.tiny_model("llama")
    input_ids, labels = th.global_batch(seq_len)
    ref_logits, ref_params = _sgd_reference(model, input_ids, labels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout)
    plan = model.ringattn_plan
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        run = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        run = fully_shard(model, mesh=mesh)
    batch = rhf.shard_batch(plan, input_ids, labels)
    logits = run(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = rhf.sequence_parallel_loss(logits, batch["labels"], grad_allreduce="mean")
    loss.backward()
    opt = torch.optim.SGD(run.parameters(), lr=LR)
    opt.step()
    err = {"logits": (logits.detach() - plan.shard(ref_logits, dim=1)).abs().max().item(), "grad": 0.0}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        step_ref = ref_params[n] - before[n]      # -LR * the single-process gradient
        step_got = full.detach() - before[n]
        rel = ((step_got - step_ref).abs().max() / step_ref.abs().max().clamp(min=1e-12)).item()
        err["grad"] = max(err["grad"], rel)
    return {(wrapper, algorithm, layout): err}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_one_step_inside_ddp_and_fsdp2_equals_single_process(dist_pool, wrapper, world):
    results = dist_pool(world).run(_step, wrapper, "auto", "zigzag", th.SEQ[world], timeout=180)
    th.assert_close(results)
