"""transformers TrainerCallbacks on the RL loop (tracerl/callbacks.py), through the TRL-shaped API: the events a
transformers Trainer sends, in its order, with its arguments, and the control flags acted on."""

import json

import pytest
from transformers import TrainerCallback

from tracerl import TraceRLConfig, TraceRLTrainer
from tracerl.errors import UserError
from tracerl.models import build_tiny_model

ROWS = [{"prompt": p} for p in ["hello", "abc", "xyz", "the"]]


def distinct(prompts, completions, **kwargs):
    return [len(set(c)) / 8 for c in completions]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=3, learning_rate=3e-3, num_generations=4,
                per_device_train_batch_size=8, max_completion_length=8, steps=4, block_length=4, logging_steps=100,
                save_steps=0)
    return TraceRLConfig(**{**base, **kw})


class Recorder(TrainerCallback):
    """Every event with the step it saw, and what arrived with it."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.seen: dict[str, object] = {}

    def _note(self, name, args, state, control, **kwargs):
        self.events.append((name, state.global_step))
        self.seen.setdefault("args", args)
        self.seen.update({k: v for k, v in kwargs.items() if k in ("model", "optimizer", "lr_scheduler", "logs",
                                                                   "metrics", "processing_class")})

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *a, **kw: self._note(name, *a, **kw)
        return super().__getattribute__(name)


def trained_steps(tmp_path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))


def test_events_arrive_in_transformers_order_with_its_arguments(tmp_path):
    rec = Recorder()
    cfg = args(tmp_path, max_steps=2, eval_steps=2)
    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct, args=cfg,
                             train_dataset=ROWS, eval_dataset=ROWS[:2], callbacks=[rec])
    history = trainer.train()
    step = [("on_step_begin", 0), ("on_step_end", 1), ("on_log", 1),
            ("on_step_begin", 1), ("on_step_end", 2), ("on_evaluate", 2), ("on_log", 2)]
    assert rec.events == [("on_init_end", 0), ("on_train_begin", 0), ("on_evaluate", 0), ("on_log", 0), *step,
                          ("on_save", 2), ("on_train_end", 2)]
    assert rec.seen["args"] is cfg and rec.seen["model"] is trainer.model
    assert rec.seen["optimizer"] is trainer.trainer.optimizer and rec.seen["lr_scheduler"] is not None
    assert rec.seen["processing_class"] is trainer.model.tokenizer
    assert rec.seen["logs"] == history[-1] and "eval/accuracy" in rec.seen["metrics"]
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 2
    assert [h["step"] for h in trainer.state.log_history] == [0, 1, 2]  # the eval at start, then each step
    assert trainer.state.log_history[1]["reward"] == history[0]["reward"]
    assert trainer.state.epoch == 1.0  # 2 prompts per step over 4 rows


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class SaveAndEvaluateAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_save = True
            control.should_evaluate = True


def test_should_training_stop_ends_the_run_with_its_checkpoint_and_a_resume_trains_on(tmp_path):
    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct,
                             args=args(tmp_path, max_steps=4), train_dataset=ROWS, callbacks=[StopAt(1)])
    history = trainer.train()
    assert len(history) == 1 and trained_steps(tmp_path) == [1] and trainer.state.epoch == 0.5  # fractional
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1
    # the same trainer resumed: a new run's control (transformers resets should_training_stop), trains to the end
    assert len(trainer.train(resume_from_checkpoint=True)) == 3 and trainer.state.global_step == 4
    # a new process resuming gets the TrainerState's log_history back from the checkpoint
    again = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct,
                           args=args(tmp_path, max_steps=5), train_dataset=ROWS)
    again.train(resume_from_checkpoint=True)
    assert [h["step"] for h in again.state.log_history] == [1, 2, 3, 4, 5]  # the whole run, as transformers keeps it


class EvaluateAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_evaluate = state.global_step == 2


def test_should_evaluate_at_a_step_that_evaluates_anyway_evaluates_once(tmp_path):
    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct,
                             args=args(tmp_path, max_steps=4, eval_steps=2), train_dataset=ROWS,
                             eval_dataset=ROWS[:2], callbacks=[EvaluateAt()])
    history = trainer.train()
    assert ["eval/accuracy" in h for h in history] == [False, True, False, True]


def test_should_save_and_should_evaluate_act_once(tmp_path):
    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct, args=args(tmp_path),
                             train_dataset=ROWS, eval_dataset=ROWS[:2], callbacks=[SaveAndEvaluateAt])
    history = trainer.train()
    assert trained_steps(tmp_path) == [1, 3]  # step 1 on request, 3 the end of the run
    assert ["eval/accuracy" in h for h in history] == [True, False, False]
    assert isinstance(trainer.pop_callback(SaveAndEvaluateAt), SaveAndEvaluateAt)
    assert trainer.pop_callback(SaveAndEvaluateAt) is None


class Raises(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        raise KeyError("no such metric")


def test_a_callback_that_raises_is_named_with_its_event_and_step(tmp_path):
    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct, args=args(tmp_path),
                             train_dataset=ROWS, callbacks=[Raises()])
    with pytest.raises(UserError, match=r"callback Raises\.on_log at step 1 raised KeyError: 'no such metric'"):
        trainer.train()


@pytest.mark.parametrize("callbacks,match", [
    ([lambda *a: None], "expected transformers.TrainerCallback instances or classes, got function"),
    ([dict], "dict is not a transformers.TrainerCallback subclass"),
    (Recorder(), "expected a list of transformers.TrainerCallback, got Recorder"),
])
def test_what_is_not_a_callback_is_refused_before_the_model_loads(tmp_path, callbacks, match):
    with pytest.raises(UserError, match=match):
        TraceRLTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=distinct, args=args(tmp_path),
                       train_dataset=ROWS, callbacks=callbacks)


def test_a_callback_reading_training_arguments_only_fields_is_named(tmp_path):
    """transformers' EarlyStoppingCallback asserts on TrainingArguments fields a TraceRLConfig does not have."""
    from transformers import EarlyStoppingCallback

    trainer = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=distinct, args=args(tmp_path),
                             train_dataset=ROWS, callbacks=[EarlyStoppingCallback()])
    with pytest.raises(UserError, match=r"callback EarlyStoppingCallback\.on_train_begin at step 0 raised "
                                        r"AttributeError: .*load_best_model_at_end"):
        trainer.train()
