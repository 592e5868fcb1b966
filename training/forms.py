"""The launch form: a round's settings (training/config.py) as fields, initial values from a preset."""

from __future__ import annotations

from django import forms

from training import actions
from training.config import (
    FIELDS,
    PRESETS,
    SETTINGS,
    SWITCHED_TYPES,
    TEXTAREA,
    ConfigError,
    RoundConfig,
    field_help,
    round_types,
)


def form_sections() -> list[tuple[str, list[str]]]:
    """The launch form's sections, in field order, each with the settings it shows (Setting.section)."""
    sections: dict[str, list[str]] = {}
    for name, about in SETTINGS.items():
        if about.section:
            sections.setdefault(about.section, []).append(name)
    return list(sections.items())


def shown_for(names: list[str]) -> str:
    """The round types that settings `names` apply to, space-separated (Setting.algorithms); "" for every type:
    the form hides a section or field that does not apply to the algorithm chosen (CSS :has, no script)."""
    tags = [SETTINGS[name].algorithms for name in names]
    return "" if () in tags else " ".join(dict.fromkeys(a for tag in tags for a in tag))


class LaunchRoundForm(forms.Form):
    preset = forms.ChoiceField(choices=[(name, name) for name in PRESETS], help_text=field_help("preset"))

    def __init__(self, *args, campaign, preset: str = "demo", **kwargs):
        """Initial values: the preset's, with the campaign's own settings over them (actions.campaign_settings)."""
        super().__init__(*args, **kwargs)
        self.campaign = campaign
        defaults = PRESETS.get(preset, PRESETS["demo"])
        self.fields["preset"].initial = defaults.preset
        initial = {**defaults.as_dict(), **actions.campaign_settings(campaign)}
        for _, names in form_sections():
            for name in names:
                self.fields[name] = self._field(name, initial[name])

    @staticmethod
    def _field(name: str, initial):
        kind, about = FIELDS[name].type, SETTINGS[name]
        common = {"initial": initial, "help_text": field_help(name), "label": about.label}
        if about.choices is not None:
            return forms.ChoiceField(choices=list(about.choices.items()), **common)
        low, high = about.bounds or (None, None)
        if kind == "int":
            return forms.IntegerField(min_value=low, max_value=high, **common)
        if kind == "float":
            return forms.FloatField(min_value=low, max_value=high, **common)
        if kind == "bool":
            return forms.BooleanField(required=False, **common)
        if about.widget == TEXTAREA:
            return forms.CharField(required=False, strip=False, widget=forms.Textarea(attrs={"rows": 2}), **common)
        return forms.CharField(required=False, **common)

    def sections(self):
        """(title, round types it shows for, [(bound field, round types it shows for)]): "" for every type."""
        return [(title, shown_for(names), [(self[name], shown_for([name])) for name in names])
                for title, names in form_sections()]

    def algorithms(self) -> list[str]:
        return [value for value, _ in self.fields["algorithm"].choices]

    def switched_types(self) -> list[tuple[str, str, str]]:
        """(round type, its algorithm, the checkbox that switches it on) of config.SWITCHED_TYPES, for the CSS that
        shows that type's settings while its algorithm is chosen and its box is ticked."""
        return [(kind, base, switch) for kind, (base, switch) in SWITCHED_TYPES.items()]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        # What the page hid (another round type's settings, still posted) is not the admin's to launch with.
        types = round_types(cleaned.get("algorithm") or RoundConfig.algorithm, cleaned)
        values = {k: v for k, v in cleaned.items() if k != "preset" and SETTINGS[k].applies_to(types)}
        try:
            self.config = actions.launch_config(self.campaign, cleaned.get("preset", "demo"), values)
        except ConfigError as exc:
            for name, problem in exc.problems.items():
                self.add_error(name if name in self.fields else None, problem)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return cleaned

    config: RoundConfig
