"""Which judgments a round trains on, by who made them: the choices of its `judgments` setting, read by the
export (annotate/exporting.py) and the round settings (training/config.py) without loading either."""

HUMANS, HUMANS_AND_AI, AI_WHERE_NO_HUMAN = "humans", "humans_and_ai", "ai_where_no_human"
AI_SELECTIONS = {
    HUMANS: "every judgment but AI labelers'",
    HUMANS_AND_AI: "every judgment, AI labelers' too",
    AI_WHERE_NO_HUMAN: "every judgment but AI labelers', and theirs on pairs no one else judged",
}

# Which AI-proposed revisions (Constitutional AI's critique and revision) a round's SFT job learns from: the
# choices of its `cai_accept` setting, read by annotate.models.AIRevision.accepted.
ACCEPT_PEOPLE, ACCEPT_AI = "people", "ai"
CAI_ACCEPTS = {
    ACCEPT_PEOPLE: "people: the revisions that more than half of the people who judged the pair preferred",
    ACCEPT_AI: "ai: every revision the AI proposed that the people have not overturned (more than half of them "
               "preferring the original)",
}
