"""pyreft compatibility: its rotation state (:mod:`.rotation`) and ``import pyreft`` resolving to
reft_kernels (:mod:`.alias`). pyreft's state-dict keys live beside the classes that read them
(:mod:`reft_kernels.interventions.pyreft_keys`: outside that package they would close an import
cycle through it); pyreft's checkpoint directories are read and written by
:mod:`reft_kernels.checkpoint.pyreft_format` (it builds on the checkpoint package, which imports it
back).
"""
