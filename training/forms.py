"""The launch form: a round's settings (training/config.py) as fields, initial values from a preset."""

from __future__ import annotations

from django import forms

from training import actions
from training.config import (
    BOUNDS,
    FIELDS,
    PAIRINGS,
    PRESETS,
    ConfigError,
    RoundConfig,
    field_help,
)

SECTIONS = [
    ("Models and prompting", ["reward_model", "reference", "system_prompt", "stop_strings"]),
    ("Reward model", ["reward_epochs", "reward_lr", "reward_warmup_ratio", "reward_batch_size",
                      "reward_max_length"]),
    ("PPO", ["ppo_steps", "ppo_batch_size", "ppo_samples_per_prompt", "ppo_mini_batch_size", "ppo_kl_coef", "ppo_lr",
             "ppo_max_new_tokens"]),
    ("Sampling", ["sample_prompts", "sample_per_prompt", "sample_temperature", "top_p"]),
    ("New pairs", ["pairing", "priority"]),
    ("Memory", ["lora_r", "gradient_checkpointing"]),
]

LABELS = {"lr": "Learning rate", "warmup_ratio": "Warm-up share", "kl_coef": "KL coefficient",
          "per_prompt": "Responses per prompt", "prompts": "Prompts", "model": "Backbone", "prompt": "System prompt", "strings": "Stop strings",
          "p": "Top-p", "reference": "Reference policy", "r": "LoRA rank",
          "checkpointing": "Gradient checkpointing"}
TEXTAREAS = ("system_prompt", "stop_strings")


class LaunchRoundForm(forms.Form):
    preset = forms.ChoiceField(choices=[(name, name) for name in PRESETS], help_text=field_help("preset"))

    def __init__(self, *args, campaign, preset: str = "demo", **kwargs):
        """Initial values: the preset's, with the campaign's own settings over them (actions.campaign_settings)."""
        super().__init__(*args, **kwargs)
        self.campaign = campaign
        defaults = PRESETS.get(preset, PRESETS["demo"])
        self.fields["preset"].initial = defaults.preset
        initial = {**defaults.as_dict(), **actions.campaign_settings(campaign)}
        for _, names in SECTIONS:
            for name in names:
                self.fields[name] = self._field(name, initial[name])

    @staticmethod
    def _field(name: str, initial):
        kind = FIELDS[name].type
        words = name.split("_", 1)[1] if "_" in name else name
        label = LABELS.get(words, words.replace("_", " ").capitalize())
        common = {"initial": initial, "help_text": field_help(name), "label": label}
        if name == "pairing":
            return forms.ChoiceField(choices=list(PAIRINGS.items()), **common)
        low, high, _ = BOUNDS.get(name, (None, None, False))
        if kind == "int":
            return forms.IntegerField(min_value=low, max_value=high, **common)
        if kind == "float":
            return forms.FloatField(min_value=low, max_value=high, **common)
        if kind == "bool":
            return forms.BooleanField(required=False, **common)
        if name in TEXTAREAS:
            return forms.CharField(required=False, strip=False, widget=forms.Textarea(attrs={"rows": 2}), **common)
        return forms.CharField(required=False, **common)

    def sections(self):
        return [(title, [self[name] for name in names]) for title, names in SECTIONS]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        values = {k: v for k, v in cleaned.items() if k != "preset"}
        try:
            self.config = actions.launch_config(self.campaign, cleaned.get("preset", "demo"), values)
        except ConfigError as exc:
            for name, problem in exc.problems.items():
                self.add_error(name if name in self.fields else None, problem)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return cleaned

    config: RoundConfig
