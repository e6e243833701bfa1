"""SGLang model classes of the DFLARE plugin, registered with SGLang's ``ModelRegistry``
(each module's ``EntryClass`` is matched against a checkpoint's ``architectures[0]``)."""
