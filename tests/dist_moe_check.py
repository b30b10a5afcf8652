"""The mixture-of-experts thinker under 2-rank ZeRO-3 when the ranks route to different
experts (helper of tests/test_native_zero3.py::test_moe_experts_routed_on_one_rank_get_their_gradient;
in the suite, `main(argv)` is a step of the shared launch, tests/shared_launch.py).

    deepspeed --num_gpus 2 tests/dist_moe_check.py --shards SPEC --ds_config DS.json --out result.json

Each rank runs one Self-KD micro-batch of its own (tiny-qwen3_omni, the Trainer's engine,
shared teacher) forward and backward, records which experts its router chose for the tokens
that reach the loss, and gathers the full gradient of every layer's fused expert parameters
(`gate_up_proj`, `down_proj`). Rank 0 compares them, expert by expert, with a plain
single-process model from the same initial weights, whose loss is both ranks' token sums
over the step's answer tokens (the Trainer's normaliser undoes DeepSpeed's average).

The batch seeds are picked on rank 0 among a few candidates so that some expert is reached
by one rank only and some by neither. "Reached": the student pass routed to it a token whose
output can change the loss: in the last layer the positions that predict answer tokens, in
earlier layers every attended position up to a sample's last such position (a later token
is seen by no answer position under causal attention). Experts routed only from other
positions get an exact zero gradient as well.
"""

import argparse
import itertools
import json

import deepspeed
import torch

from trainer.distill.objective import answer_index

SEEDS = range(6)  # candidate batch seeds, one batch of 1 sample per rank


def reached_experts(routes: dict, batch) -> dict:
    """Per layer, the experts chosen for a token that can change the loss (module docstring).
    `routes`: layer -> (B*T, k) expert indices of the student pass."""
    batch_size, width = batch.student_input_ids.shape
    index, _, _ = answer_index(batch.student_labels)
    last_answer = torch.full((batch_size,), -1)
    for flat in index.tolist():
        last_answer[flat // width] = max(int(last_answer[flat // width]), flat % width)
    earlier = ((torch.arange(width)[None] <= last_answer[:, None]) & batch.student_attention_mask.bool()).reshape(-1)
    last = torch.zeros(batch_size * width, dtype=torch.bool)
    last[index] = True
    top = max(routes)
    return {layer: sorted(set(chosen[last if layer == top else earlier].flatten().tolist()))
            for layer, chosen in routes.items()}


def record_routes(model) -> dict:
    """Hook every router: layer -> expert indices (B*T, k) of its last call with grad on (the
    student pass; the teacher pass runs without grad)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextTopKRouter

    routes = {}
    for layer, decoder_layer in enumerate(model.adapter.language_model.layers):
        router = decoder_layer.mlp.gate
        assert isinstance(router, Qwen3OmniMoeThinkerTextTopKRouter), type(router)

        def hook(module, args, out, layer=layer):
            if torch.is_grad_enabled():
                routes[layer] = out[2].detach().cpu()

        router.register_forward_hook(hook)
    return routes


def record_gathers(model) -> list:
    """Hook every Experts module: what its fused parameters look like while it runs (after
    ZeRO-3's own pre-forward hook) and right after (after its release hook)."""
    seen = []
    for layer, decoder_layer in enumerate(model.adapter.language_model.layers):
        experts = decoder_layer.mlp.experts

        def state(module):
            return {name: [p.ds_status.name, p.numel(), p.ds_numel, p.ds_tensor.numel()]
                    for name, p in module.named_parameters(recurse=False)}

        experts.register_forward_pre_hook(lambda m, a, layer=layer: seen.append(("during", layer, state(m))))
        experts.register_forward_hook(lambda m, a, o, layer=layer: seen.append(("after", layer, state(m))))
    return seen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True, help="any train shards: the Trainer wants a loader")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args(argv)

    from trainer import dist
    from trainer.config import load_config
    from trainer.distill.objective import SelfKDObjective
    from trainer.loop import Trainer, answer_chunks_for
    from trainer.models.factory import build_model
    from trainer.models.synthetic import make_batch

    config = load_config(["--model", "tiny-qwen3_omni", "--train_shards", args.shards, "--ds_config", args.ds_config,
                          "--micro_batch_size", "1", "--num_workers", "0", "--kd_alpha", "0.75", "--max_steps", "1"])
    # The reference is a plain single-process model, built before the Trainer makes Hugging
    # Face build everything partitioned.
    reference, _ = build_model(config.model)
    reference_routes = record_routes(reference)

    trainer = Trainer(config)
    model, engine = trainer.model, trainer.engine
    experts = {(layer, name): param for layer, decoder_layer in enumerate(model.adapter.language_model.layers)
               for name, param in decoder_layer.mlp.experts.named_parameters(recurse=False)}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference.load_state_dict(initial)
    reference_objective = SelfKDObjective(reference, trainer.kd, chunk_size=trainer.objective.chunk_size,
                                          share_prefix=trainer.objective.share_prefix)

    # Seeds: rank 0 tries the candidates on the reference (the engine's weights) and tells rank 1.
    batches = {seed: make_batch(trainer.processor, 1, seed=seed) for seed in SEEDS}
    choice = None
    if dist.is_main():
        reached = {}
        for seed, batch in batches.items():
            reference_objective(batch, 1.0)  # with grad, as the routes are recorded; no backward
            reached[seed] = reached_experts(reference_routes, batch)
        for a, b in itertools.permutations(SEEDS, 2):
            one_only = any(set(reached[a][layer]) ^ set(reached[b][layer]) for layer in reached[a])
            neither = any(len(set(reached[a][layer]) | set(reached[b][layer])) < 8 for layer in reached[a])
            if one_only and neither:
                choice = [a, b]
                break
        print("experts reached per candidate seed:", reached, "-> seeds", choice, flush=True)
    choice = dist.all_gather_object(choice)[0]
    if choice is None:
        raise SystemExit(f"no pair of seeds in {list(SEEDS)} gives an expert reached by one rank only and one by neither")
    mine = batches[choice[dist.rank()]]
    both = [batches[seed] for seed in choice]

    # One micro-batch per rank, normalised as Trainer.train_step does (grad_accum 1).
    answer_tokens = sum(b.answer_tokens() for b in both)
    chunks = answer_chunks_for(max(b.answer_tokens() for b in both), trainer.objective.chunk_size)
    engine_routes = record_routes(model)
    gathers = record_gathers(model)
    out = engine(mine.to(dtype=trainer.dtype), answer_tokens / dist.world_size(), chunks)
    engine.backward(out.loss)
    engine_grads = {key: deepspeed.utils.safe_get_full_grad(param).detach().cpu().clone()
                    for key, param in experts.items()}  # collective: every rank, same order
    partitioned = {f"{layer}.{name}": [param.ds_tensor.numel(), param.ds_numel] for (layer, name), param in experts.items()}
    per_rank = dist.all_gather_object({"reached": reached_experts(engine_routes, mine),
                                       "routed": {layer: sorted(set(r.flatten().tolist())) for layer, r in engine_routes.items()},
                                       "gathers": gathers, "partitioned": partitioned})

    if dist.is_main():
        reference.zero_grad()
        reference_reached = []
        for batch in both:
            reference_objective(batch, float(answer_tokens)).loss.backward()
            reference_reached.append(reached_experts(reference_routes, batch))
        grads = []
        for (layer, name), grad in engine_grads.items():
            want = reference.get_parameter(f"vlm.model.language_model.layers.{layer}.mlp.experts.{name}").grad
            for expert in range(grad.shape[0]):
                got, ref = grad[expert], want[expert]
                grads.append({"layer": layer, "param": name, "expert": expert,
                              "engine_norm": float(got.norm()), "reference_norm": float(ref.norm()),
                              "max_abs_diff": float((got - ref).abs().max()),
                              "engine_exact_zero": bool((got == 0).all())})
        result = {"seeds": choice, "answer_tokens": answer_tokens, "ranks": per_rank,
                  "reference_reached": reference_reached, "grads": grads}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "grads"})[:3000], flush=True)
    trainer.close()
    dist.shutdown()


if __name__ == "__main__":
    main()
