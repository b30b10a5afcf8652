"""Tiny omni model (real Qwen2-VL / Whisper classes, random init) and the Self-KD objective
around it, on synthetic batches made by the trainer's own sample encoder and collator."""

import contextlib
import math

import pytest
import torch

from trainer.data.batch import IGNORE_INDEX
from trainer.distill.loss import KDSettings
from trainer.distill.objective import ObjectiveOutput, SelfKDObjective
from trainer.models.build import build_tiny, set_trainable
from trainer.models.serialize import WEIGHTS, LazyWeights, load_omni, load_weights, save_omni
from trainer.models.synthetic import make_batch
from trainer.models.tiny import build_tiny_processor

KD = KDSettings(alpha=0.75, temperature=2.0, divergence="fkl")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture()
def model(processor):
    return build_tiny(processor, attn_impl="sdpa", seed=0)


def run(model, batch, kd, normalizer=1.0, *, chunk_size=1024, answer_chunks=None, teacher=None) -> ObjectiveOutput:
    """One micro-batch through the trainer's objective around `model`."""
    objective = SelfKDObjective(model, kd, chunk_size=chunk_size)
    if teacher is not None:
        objective.teacher = teacher
    return objective(batch, normalizer, answer_chunks)


OUTPUT_FIELDS = ObjectiveOutput._fields


def count_teacher_passes(model):
    calls = {"teacher": 0, "student": 0}
    original = model.run_side

    def counting(batch, role, *args, **kwargs):
        calls[role] += 1
        return original(batch, role, *args, **kwargs)

    model.run_side = counting
    return calls


def test_forward_backward_grads_only_on_trainable(model, processor):
    out = run(model, make_batch(processor, 2), KD, 7.0, chunk_size=8)
    assert torch.isfinite(out.loss) and out.kd_sum > 0 and out.n_tokens > 0
    expected = (0.75 * 4.0 * out.kd_sum + 0.25 * out.ce_sum) / 7.0
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    for name, param in model.named_parameters():
        trains = name.startswith(("vlm.model.language_model", "vlm.lm_head", "projector"))
        assert param.requires_grad == trains, name
        assert (param.grad is not None) == trains, name


def test_sft_makes_no_teacher_pass(model, processor):
    calls = count_teacher_passes(model)
    batch = make_batch(processor, 2)
    sft = run(model, batch, KDSettings(alpha=0.0))
    assert calls == {"teacher": 0, "student": 1}
    run(model, batch, None)
    assert calls == {"teacher": 0, "student": 2}
    run(model, batch, KD)
    assert calls == {"teacher": 1, "student": 3}
    torch.testing.assert_close(sft.loss.detach(), sft.ce_sum / 1.0)


@pytest.mark.parametrize("kd", [None, KD], ids=["sft", "kd"])
def test_chunk_size_sets_lm_head_calls_with_and_without_kd(model, processor, kd):
    batch = make_batch(processor, 2)
    n_answers = int(batch.student_labels[:, 1:].ne(IGNORE_INDEX).sum())
    calls = []
    model.adapter.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        run(model, batch, kd, chunk_size=3)
    student_calls = -(-n_answers // 3)
    assert len(calls) == (2 * student_calls if kd else student_calls) and max(calls) <= 3
    calls.clear()
    with torch.no_grad():
        run(model, batch, kd, chunk_size=3, answer_chunks=2)
    assert len(calls) == (4 if kd else 2)


def test_loss_falls_on_fixed_batch(model, processor):
    batch = make_batch(processor, 1, seed=3, audio_seconds=(1.0, 1.5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = run(model, batch, KD, float(batch.answer_tokens()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_missing_modalities_run_dummy_encoders_and_grads_flow(model, processor):
    """No image (Self-KD on text-only samples) and no audio (the VL stage): both encoders
    still run, on dummy inputs, and every trainable part gets a finite gradient."""
    set_trainable(model, {"llm", "projector", "vision", "audio"})
    for batch, kd in ((make_batch(processor, 2, with_image=False), KD), (make_batch(processor, 2, stage="vl"), None)):
        model.zero_grad(set_to_none=True)
        vision_calls = []
        handle = model.adapter.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))
        audio_calls = []
        handle2 = model.audio_encoder.register_forward_hook(lambda *a: audio_calls.append(1))
        out = run(model, batch, kd)
        out.loss.backward()
        handle.remove()
        handle2.remove()
        assert vision_calls and audio_calls
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_frozen_vision_runs_without_graph(model, processor):
    image_tokens, _ = model.encode_images(make_batch(processor, 1))
    assert not image_tokens.requires_grad
    set_trainable(model, {"llm", "vision"})
    image_tokens, _ = model.encode_images(make_batch(processor, 1))
    assert image_tokens.requires_grad
    with pytest.raises(ValueError, match="unknown trainable"):
        set_trainable(model, {"llm", "ears"})


def test_mismatches_are_loud_and_name_the_sample(model, processor):
    batch = make_batch(processor, 2)
    batch.audio_token_counts = batch.audio_token_counts + torch.tensor([0, 1])
    with pytest.raises(ValueError, match="synthetic-0-1"):
        run(model, batch, KD)
    batch = make_batch(processor, 2)
    labels = batch.teacher_labels.clone()
    first_answer = (labels[1] != IGNORE_INDEX).nonzero()[0, 0]
    labels[1, first_answer] = IGNORE_INDEX
    batch.teacher_labels = labels
    with pytest.raises(ValueError, match="synthetic-0-1"):
        run(model, batch, KD)
    with pytest.raises(ValueError, match="teacher"):
        run(model, make_batch(processor, 2, stage="vl"), KD)  # Self-KD without a typed side


def test_own_weight_teacher_matches_shared_when_weights_equal(model, processor):
    """A swapping teacher (logits computed in its context) with unchanged weights must give
    exactly the shared teacher's loss."""

    class SameWeights:
        swaps_weights = True

        def context(self):
            return contextlib.nullcontext()

    batch = make_batch(processor, 2)
    shared = run(model, batch, KD, 3.0, chunk_size=8)
    swapped = run(model, batch, KD, 3.0, chunk_size=8, teacher=SameWeights())
    for key in ("loss", "kd_sum", "teacher_ce_sum", "agree_count"):
        torch.testing.assert_close(getattr(shared, key), getattr(swapped, key))


def test_save_load_gives_identical_outputs(model, processor, tmp_path):
    batch = make_batch(processor, 2, seed=5)
    with torch.no_grad():
        before = run(model, batch, KD)
    save_omni(model, processor, str(tmp_path))
    loaded, loaded_processor = load_omni(str(tmp_path), attn_impl="sdpa")
    assert loaded_processor.audio_stack == processor.audio_stack
    assert len(loaded_processor.tokenizer) == len(processor.tokenizer)
    with torch.no_grad():
        after = run(loaded, batch, KD)
    for key in OUTPUT_FIELDS:
        torch.testing.assert_close(getattr(after, key), getattr(before, key), rtol=0, atol=0)


def test_lazy_load_reads_each_stored_tensor_once(model, processor, tmp_path):
    """Name and shape checks come from the safetensors header; values are read one by one."""
    from safetensors import safe_open

    class CountingWeights(LazyWeights):
        reads = []

        def __getitem__(self, name):
            self.reads.append(name)
            return super().__getitem__(name)

    save_omni(model, processor, str(tmp_path))
    fresh = build_tiny(processor, attn_impl="sdpa", seed=1)
    with safe_open(str(tmp_path / WEIGHTS), framework="pt", device="cpu") as weights_file:
        weights = CountingWeights(weights_file)
        load_weights(fresh, weights, source=str(tmp_path))
    assert sorted(CountingWeights.reads) == sorted(weights)
    for name, param in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], param), name


def naive_greedy(model, batch, role, max_new_tokens):
    """No cache: re-run the whole sequence for every new token, positions recomputed (DeepStack rows re-added)."""
    input_ids, attention_mask, _ = batch.side(role)
    image_tokens, _ = model.encode_images(batch)
    audio_tokens, _ = model.encode_audio(batch)
    audio_tokens = audio_tokens if role == "student" else None
    eos = model.processor.tokenizer.convert_tokens_to_ids(model.processor.turn_end)
    outputs = [[] for _ in range(input_ids.shape[0])]
    for _ in range(max_new_tokens):
        embeds = model.embed(input_ids, image_tokens, audio_tokens)
        positions = model.adapter.position_ids(input_ids, batch.image_grid_thw, attention_mask)
        hidden, _ = model.adapter.decode(embeds, positions, attention_mask, **model.decoder_extras(input_ids, image_tokens))
        next_ids = model.adapter.lm_head(hidden[:, -1]).argmax(-1)
        for row, token in zip(outputs, next_ids.tolist()):
            if not row or row[-1] != eos:
                row.append(token)
        input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return outputs


@pytest.mark.parametrize("mode", ["text", "audio"])
def test_generate_matches_naive_reference(model, processor, mode):
    batch = make_batch(processor, 3, seed=1, stage="eval")
    role = "teacher" if mode == "text" else "student"
    assert batch.side(role)[1][:, 0].eq(0).any(), "want left padding in the batch"
    model.eval()
    with torch.no_grad():
        fast = model.generate_ids(batch, mode, 6, synced_gpus=True)
        slow = naive_greedy(model, batch, role, 6)
        texts = model.generate(batch, mode, 6)
    assert fast == slow
    assert texts == processor.tokenizer.batch_decode(fast, skip_special_tokens=True)


def test_tied_embeddings_save_load_and_lm_head_grad(processor, tmp_path):
    """Qwen2-VL-2B ties the LM head to the embeddings: the chunked head must still train
    the shared matrix, and the export stores it once and re-ties it on load."""
    from trainer.models.build import build_from_configs
    from trainer.models.tiny import tiny_vlm_config, tiny_whisper_config

    vlm_config = tiny_vlm_config(len(processor.tokenizer))
    vlm_config.tie_word_embeddings = True
    vlm_config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = build_from_configs(vlm_config, tiny_whisper_config(80, 1000), processor, attn_impl="sdpa")
    assert model.adapter.lm_head.weight is model.adapter.input_embeddings().weight
    batch = make_batch(processor, 2)
    out = run(model, batch, KD)
    out.loss.backward()
    assert model.adapter.lm_head.weight.grad is not None
    save_omni(model, processor, str(tmp_path))
    loaded, _ = load_omni(str(tmp_path), attn_impl="sdpa")
    assert loaded.adapter.lm_head.weight is loaded.adapter.input_embeddings().weight
    with torch.no_grad():
        before, after = run(model, batch, KD), run(loaded, batch, KD)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)


def tiny_qwen25_vl_config(vocab_size):
    from transformers import Qwen2_5_VLConfig

    from trainer.models.tiny import tiny_vlm_config

    fields = tiny_vlm_config(vocab_size).to_dict()
    fields.pop("model_type")
    fields["vision_config"] = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                   window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(**fields)


def test_qwen25_vl_adapter_trains_and_generates(processor):
    from trainer.models.build import build_from_configs
    from trainer.models.tiny import tiny_whisper_config

    torch.manual_seed(0)
    model = build_from_configs(tiny_qwen25_vl_config(len(processor.tokenizer)), tiny_whisper_config(80, 1000), processor,
                               attn_impl="sdpa")
    assert type(model.adapter).__name__ == "Qwen25VLAdapter"
    out = run(model, make_batch(processor, 2), KD)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projector.net[0].weight.grad is not None
    batch = make_batch(processor, 2, seed=1, stage="eval")
    with torch.no_grad():
        assert model.generate_ids(batch, "audio", 4, synced_gpus=True) == naive_greedy(model, batch, "student", 4)


def test_compose_loads_pretrained_vlm_and_whisper_encoder_only(processor, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration, WhisperForConditionalGeneration

    from trainer.models.build import compose
    from trainer.models.tiny import tiny_vlm_config, tiny_whisper_config

    whisper_config = tiny_whisper_config(80, 1000)
    # The tiny Whisper config only sizes an encoder; a full checkpoint needs in-vocab ids.
    whisper_config.pad_token_id = whisper_config.bos_token_id = whisper_config.eos_token_id = 0
    whisper_config.decoder_start_token_id = 0
    torch.manual_seed(1)
    whisper = WhisperForConditionalGeneration(whisper_config)
    whisper.save_pretrained(tmp_path / "whisper")
    vlm = Qwen2VLForConditionalGeneration(tiny_vlm_config(len(processor.tokenizer)))
    vlm.save_pretrained(tmp_path / "vlm")
    model = compose(str(tmp_path / "vlm"), str(tmp_path / "whisper"), processor, dtype=torch.float32, attn_impl="sdpa")
    for name, weight in whisper.model.encoder.state_dict().items():
        assert torch.equal(model.audio_encoder.state_dict()[name], weight), name
    for name, weight in vlm.state_dict().items():
        assert torch.equal(model.vlm.state_dict()[name], weight), name
    assert torch.isfinite(run(model, make_batch(processor, 1), KD).loss)


def captured_teacher(model, batch, *, share_prefix):
    """The objective's output and the teacher's answer hidden states (what the LM head turns
    into teacher logits), with or without the shared prefix."""
    import trainer.distill.objective as objective_module

    captured = {}
    original = objective_module.answer_token_loss

    def capture(*args, **kwargs):
        captured["teacher_hidden"] = kwargs["teacher_hidden"]
        return original(*args, **kwargs)

    objective_module.answer_token_loss = capture
    try:
        objective = SelfKDObjective(model, KD, chunk_size=8, share_prefix=share_prefix)
        with torch.no_grad():
            out = objective(batch, 3.0)
    finally:
        objective_module.answer_token_loss = original
    return out, captured["teacher_hidden"]


@pytest.mark.parametrize("sizes", [[(56, 84), (112, 56), None], [(84, 84), (84, 84)]],
                         ids=["mixed-sizes-and-text-only", "same-size-images-in-the-prefix"])
def test_prefix_shared_teacher_equals_the_full_teacher_pass(model, processor, sizes):
    """The teacher that reuses the student's keys and values for the shared prefix gives the
    full teacher pass's answer hidden states and logits (fp32, 1e-5), computing fewer tokens:
    with images of different sizes and a text-only sample the prefix is the system prompt and
    the other images' tokens are recomputed; with one image size the image is in the prefix."""
    from trainer.distill.objective import shared_prefix_length

    batch = make_batch(processor, len(sizes), seed=4, image_size=sizes)
    prefix = shared_prefix_length(batch)
    assert 0 < prefix < int((batch.teacher_labels[0] != IGNORE_INDEX).nonzero()[0, 0])
    image_in_prefix = bool((batch.teacher_input_ids[:, :prefix] == model.image_token_id).any())
    assert image_in_prefix == (None not in sizes and len(set(sizes)) == 1)
    full, full_hidden = captured_teacher(model, batch, share_prefix=False)
    shared, shared_hidden = captured_teacher(model, batch, share_prefix=True)
    torch.testing.assert_close(shared_hidden, full_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.adapter.lm_head(shared_hidden), model.adapter.lm_head(full_hidden),
                               rtol=1e-5, atol=1e-5)
    for key in ("loss", "kd_sum", "teacher_ce_sum", "agree_count", "ce_sum"):
        torch.testing.assert_close(getattr(shared, key), getattr(full, key), rtol=1e-5, atol=1e-5)
    assert full.teacher_tokens == batch.teacher_attention_mask.sum()
    assert shared.teacher_tokens == full.teacher_tokens - prefix * len(sizes)


def test_prefix_sharing_is_off_where_it_would_differ(model, processor):
    """Frozen / EMA teachers (other weights) and gradient checkpointing run the whole typed
    sequence; so does a batch whose sides share nothing."""
    from trainer.distill.objective import shared_prefix_length

    class OwnWeights:
        swaps_weights = True

        def context(self):
            return contextlib.nullcontext()

    batch = make_batch(processor, 2, seed=2)
    objective = SelfKDObjective(model, KD)
    assert objective._prefix_to_share(batch) == shared_prefix_length(batch) > 0
    objective.teacher = OwnWeights()
    assert objective._prefix_to_share(batch) == 0
    objective = SelfKDObjective(model, KD)
    model.adapter.language_model.gradient_checkpointing = True
    try:
        assert objective.train()._prefix_to_share(batch) == 0
    finally:
        model.adapter.language_model.gradient_checkpointing = False
    batch.teacher_input_ids = batch.teacher_input_ids.clone()
    batch.teacher_input_ids[:, 0] = batch.teacher_input_ids[:, 0] + 1
    assert shared_prefix_length(batch) == 0 and SelfKDObjective(model, KD)._prefix_to_share(batch) == 0


@pytest.mark.parametrize("stage", ["selfkd", "eval"])
def test_collator_positions_equal_the_vlm_rope_index(model, processor, stage):
    """The sample encoder's M-RoPE positions (CPU, per sample) are the VLM's own
    get_rope_index on every real token, with images of different sizes and a text-only
    sample, right-padded (training) and left-padded (evaluation)."""
    batch = make_batch(processor, 3, seed=6, image_size=[(112, 56), None, (56, 84)], stage=stage)
    for role in ("student", "teacher"):
        input_ids, mask, _ = batch.side(role)
        reference = model.adapter.position_ids(input_ids, batch.image_grid_thw, mask)
        ours = batch.position_ids(role)
        assert ours.shape == reference.shape
        assert torch.equal(ours[:, mask.bool()], reference[:, mask.bool()]), role


def test_the_toy_preset_is_the_tiny_classes_larger_and_round_trips(tmp_path):
    """`--model toy` (the toy study's start): 4-layer 128-d LLM, 4-block 64-d vision tower, 64-d
    Whisper, pictures up to 224x224 px (64 image tokens for a square picture); it trains, and an
    export loads back with the same processor and outputs."""
    from types import SimpleNamespace

    from trainer.data.collate import image_max_pixels
    from trainer.models.factory import build_model

    cfg = SimpleNamespace(model="toy", vlm=None, audio_encoder=None, audio_stack=4, projector="mlp",
                          trainable=("llm", "projector", "vision", "audio"), attn_impl="sdpa",
                          gradient_checkpointing=False)
    model, processor = build_model(cfg)
    text = model.vlm.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (128, 4)
    assert (model.vlm.config.vision_config.depth, model.vlm.config.vision_config.embed_dim) == (4, 64)
    assert model.audio_encoder.config.d_model == 64
    assert image_max_pixels(processor.image_processor) == 224 * 224
    batch = make_batch(processor, 2, seed=1, image_size=(224, 224))
    assert int(batch.image_grid_thw[0].prod()) // 4 == 64
    out = run(model, batch, KD, float(batch.answer_tokens()))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    save_omni(model, processor, str(tmp_path))
    loaded, loaded_processor = load_omni(str(tmp_path), attn_impl="sdpa")
    assert image_max_pixels(loaded_processor.image_processor) == 224 * 224
    with torch.no_grad():
        before, after = run(model, batch, KD), run(loaded, batch, KD)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_the_toy_llm_tells_picture_rows_and_columns_apart(preset):
    """M-RoPE places an image token in row i, column j at (t, s + i, s + j) and gives the height
    and width sections of a head's frequencies to those axes. The LLM can only tell columns apart
    if the width frequencies turn by a usable angle across the picture (8 tokens at 224 px).
    Reference: the rotary angles computed by hand from head_dim, theta and the sections, and
    the model's own rotary embedding on two tokens of one row, columns 0 and 7."""
    from types import SimpleNamespace

    from trainer.models.factory import build_model

    cfg = SimpleNamespace(model=preset, vlm=None, audio_encoder=None, audio_stack=4, projector="mlp",
                          trainable=("llm", "projector"), attn_impl="sdpa", gradient_checkpointing=False)
    model, _ = build_model(cfg)
    text = model.vlm.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    theta = text.rope_parameters["rope_theta"]
    sections = text.rope_parameters["mrope_section"]
    freqs = [theta ** (-2 * k / head_dim) for k in range(head_dim // 2)]
    width = freqs[sum(sections[:2]):]
    assert len(width) == sections[2]
    span = 7  # columns 0 and 7 of a 224 px picture
    # The model's rotary embedding: the same row, columns 0 and 7, differ only in the width section.
    rotary = model.vlm.model.language_model.rotary_emb
    position_ids = torch.tensor([[[20, 20]], [[20, 20]], [[20, 20 + span]]])  # (t, h, w), batch 1, 2 tokens
    cos, sin = rotary(torch.zeros(1, 2, head_dim), position_ids)
    angle = torch.atan2(sin[0, 1, : head_dim // 2], cos[0, 1, : head_dim // 2]) - \
        torch.atan2(sin[0, 0, : head_dim // 2], cos[0, 0, : head_dim // 2])
    angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    expected = torch.tensor([0.0] * sum(sections[:2]) + [math.remainder(f * span, 2 * math.pi) for f in width])
    torch.testing.assert_close(angle, expected, atol=1e-5, rtol=0)
    if preset == "tiny":  # Qwen2-VL's theta: left and right look the same to the LLM
        assert max(width) * span < 0.01
    else:  # the toy study's start must answer "Where is the red square?"
        assert theta == 10.0
        assert min(width) * span > 0.75


def test_whisper_reads_the_longest_clip_in_whole_projector_groups(processor):
    """whisper_input "clip" (new composed models): Whisper's input is the batch's longest valid
    clip rounded up to 2 x audio_stack mel frames, its output has half as many positions, and
    "window" reads the whole window as before."""
    model = build_tiny(processor, attn_impl="sdpa", seed=0)
    assert model.whisper_input == "clip"
    batch = make_batch(processor, 3, seed=5, audio_seconds=(1.0, 3.0))
    group = 2 * processor.audio_stack
    longest = int(batch.audio_frames.max())
    frames = model.encoder_input_frames(batch.audio_frames)
    assert frames % group == 0 and longest <= frames < longest + group
    seen = []
    hook = model.audio_encoder.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1],
                                                                                       out.last_hidden_state.shape[1])))
    with torch.no_grad():
        run(model, batch, KD)
        model.whisper_input = "window"
        run(model, batch, KD)
    hook.remove()
    window = model.audio_encoder.config.max_source_positions * 2
    assert seen == [(frames, frames // 2), (window, window // 2)]
    assert model.encoder_input_frames(None) == window and frames < window


def test_whisper_on_cut_input_is_huggingface_whisper_with_a_shorter_window(processor):
    """The cut-input forward equals transformers' own WhisperEncoder built for a window of that
    length (its position table the first rows of ours), on the same weights (fp32, 1e-6)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model = build_tiny(processor, attn_impl="sdpa", seed=0).eval()
    encoder = model.audio_encoder
    frames = 48
    features = torch.randn(2, encoder.config.num_mel_bins, frames)
    short = WhisperEncoder(WhisperConfig(**{**encoder.config.to_dict(), "max_source_positions": frames // 2})).eval()
    state = {k: (v[: frames // 2] if k == "embed_positions.weight" else v) for k, v in encoder.state_dict().items()}
    short.load_state_dict(state)
    with torch.no_grad():
        ours = encoder(features).last_hidden_state
        reference = short(features).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="even number of frames"):
        encoder(torch.randn(1, encoder.config.num_mel_bins, 47))


def test_the_whisper_input_is_saved_and_old_models_keep_the_window(processor, tmp_path):
    """omni_config.json records whisper_input; one written before the option (no key) loads
    with the window it was trained with; --whisper_input overrides either."""
    import json

    from trainer.config import ModelConfig
    from trainer.models.factory import build_model

    model = build_tiny(processor, attn_impl="sdpa", seed=0)
    save_omni(model, processor, str(tmp_path / "new"))
    spec_path = tmp_path / "new" / "omni_config.json"
    assert json.loads(spec_path.read_text())["whisper_input"] == "clip"
    assert load_omni(str(tmp_path / "new"))[0].whisper_input == "clip"
    spec = json.loads(spec_path.read_text())
    del spec["whisper_input"]
    spec_path.write_text(json.dumps(spec))
    assert load_omni(str(tmp_path / "new"))[0].whisper_input == "window"
    assert build_model(ModelConfig(model=str(tmp_path / "new"), whisper_input="clip"))[0].whisper_input == "clip"
    assert build_model(ModelConfig(model="tiny", whisper_input="window"))[0].whisper_input == "window"
    assert build_model(ModelConfig(model="tiny"))[0].whisper_input == "clip"
