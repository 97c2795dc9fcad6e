"""The generated task family and the shared train / evaluate helpers of the method experiments."""

import pytest
import torch

from lora_fast.methods import tasks


def test_word_tasks_and_bad_names():
    assert tasks.WORD_TASKS["repeat3"].apply("cat") == "cat cat cat"
    assert tasks.WORD_TASKS["first2"].apply("zebra") == "ze"
    assert [t.name for t in tasks.word_tasks(["upper", "last"])] == ["upper", "last"]
    with pytest.raises(ValueError, match="unknown task 'shout'"):
        tasks.word_tasks(["upper", "shout"])
    assert not set(tasks.WORDS) & set(tasks.HELD_OUT_WORDS)


def test_wide_word_split_is_disjoint_unique_and_extends_the_narrow_one():
    train, held_out = tasks.WIDE_WORDS, tasks.WIDE_HELD_OUT_WORDS
    assert not set(train) & set(held_out)
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert train[: len(tasks.WORDS)] == tasks.WORDS
    assert held_out[: len(tasks.HELD_OUT_WORDS)] == tasks.HELD_OUT_WORDS
    assert len(held_out) >= 4 * len(tasks.HELD_OUT_WORDS)
    validation, validation_train = tasks.VALIDATION_WORDS, tasks.VALIDATION_TRAIN_WORDS
    assert set(validation) | set(validation_train) <= set(train)
    assert not set(validation) & set(validation_train)
    # no word is another word plus "s": the plural task's answer must not be a training prompt
    every = set(train) | set(held_out)
    assert not [w for w in every if w.endswith("s") and w[:-1] in every]
    assert all(w.isalpha() and w.islower() for w in every)


def test_encode_labels_only_answers_and_accuracy_is_teacher_forced():
    codec = tasks.CharCodec()
    ids, labels, attention = tasks.encode(codec, [("ab", "AB"), ("abc", "c"), ("a", "b")])
    assert ids.shape == labels.shape == attention.shape == (3, 6)
    assert attention[2].tolist() == [1, 1, 1, 1, 0, 0] and ids[2, 4:].eq(codec.pad_id).all()
    assert labels[0].tolist() == [-100, -100, -100] + codec.answer("AB")
    assert labels[1].tolist() == [-100] * 4 + codec.answer("c")
    assert attention[1].tolist() == [1, 1, 1, 1, 1, 1] and attention[0].tolist() == [1] * 6
    # logits that put all mass on the next label: exact; break one answer token: not exact
    ids, labels = ids[:2], labels[:2]
    logits = torch.zeros(2, 6, codec.vocab_size)
    for row in range(2):
        for pos in range(5):
            target = labels[row, pos + 1]
            if target >= 0:
                logits[row, pos, target] = 1.0
    exact, fraction = tasks.answer_accuracy(logits, labels)
    assert exact.tolist() == [True, True] and fraction.tolist() == [1.0, 1.0]
    logits[0, 3] = 0
    logits[0, 3, 1] = 1.0
    exact, fraction = tasks.answer_accuracy(logits, labels)
    assert exact.tolist() == [False, True] and fraction[0] == pytest.approx(2 / 3)


def test_char_codec_names_bad_text():
    with pytest.raises(ValueError, match="CharCodec cannot encode"):
        tasks.CharCodec().prompt("a1")


def test_evaluate_and_train_use_the_instruction_when_asked(monkeypatch):
    model, codec = tasks.load_model(tiny=True, seed=0)
    seen_prompts = []
    original = tasks.encode

    def spy(codec, pairs):
        seen_prompts.extend(prompt for prompt, _ in pairs)
        return original(codec, pairs)

    monkeypatch.setattr(tasks, "encode", spy)
    family = tasks.word_tasks(["upper", "first2"])
    tasks.evaluate(model, codec, family, [-1, -1], 1, words=["apple"], instructed=True)
    assert seen_prompts == ["Write in capitals: apple", "First two letters: apple"]
    seen_prompts.clear()
    tasks.evaluate(model, codec, family, [-1, -1], 1, words=["apple"])
    assert seen_prompts == ["apple", "apple"]
    seen_prompts.clear()
    params = [next(model.parameters())]
    tasks.train_mixed(model, params, codec, family, [-1, -1], 1, 1, 1, 0.0, 0, "t", instructed=True)
    assert {p.split(":")[0] for p in seen_prompts} == {"Write in capitals", "First two letters"}


def test_train_mixed_does_not_depend_on_the_callers_random_state():
    import lora_fast

    family = tasks.word_tasks(["upper", "first2"])

    def run(prior_draws: int) -> list[float]:
        model, codec = tasks.load_model(tiny=True, seed=0)
        for param in model.parameters():
            param.requires_grad_(False)
        modules = tasks.target_linears(model, ("q_proj", "v_proj"))
        stacks = lora_fast.AdapterStacks(num_slots=2, max_rank=2)
        for name in ("a", "b"):
            stacks.add(name, tasks.fresh_lora(model, modules, 2, torch.Generator().manual_seed(1)), 2.0)
        layers = lora_fast.inject_adapters(model, stacks, dropout=0.5)  # dropout draws random masks
        params = [p for layer in layers.values() for p in layer.train_slots([0, 1])]
        torch.manual_seed(123)
        torch.rand(prior_draws)  # whatever ran before moves the global generator
        before = torch.get_rng_state()
        losses = tasks.train_mixed(model, params, codec, family, [0, 1], 2, 3, 2, 1e-2, 0, "t")
        assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is restored
        return losses

    assert run(0) == run(17)
