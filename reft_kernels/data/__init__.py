"""Data: pyreft's data modules (:mod:`.datasets`, pyreft's ``pyreft.dataset``), positions, the
collator and generation inputs (:mod:`.positions`), pyreft's dataset classes (:mod:`.classes`,
:mod:`.preference`), prompt templates (:mod:`.templates`); ``instructions.jsonl`` is the shipped
demo data.
"""
