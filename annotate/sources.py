"""Which judgments a round trains on, by who made them: the choices of its `judgments` setting, read by the
export (annotate/exporting.py) and the round settings (training/config.py) without loading either."""

HUMANS, HUMANS_AND_AI, AI_WHERE_NO_HUMAN = "humans", "humans_and_ai", "ai_where_no_human"
AI_SELECTIONS = {
    HUMANS: "every judgment but AI labelers'",
    HUMANS_AND_AI: "every judgment, AI labelers' too",
    AI_WHERE_NO_HUMAN: "every judgment but AI labelers', and theirs on pairs no one else judged",
}
