"""Training: the trainers (:mod:`.trainer`) and pyreft's ``pyreft.reft_trainer`` module path
(:mod:`.reft_trainer`)."""
