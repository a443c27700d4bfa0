"""A teacher wrapper for budget tests: counts the images the teacher is really called on."""

from ftikd.teacher import Teacher


class CountingTeacher(Teacher):
    """``base`` (with its feature names, if any), counting in ``seen`` every image it is run on."""

    def __init__(self, base: Teacher):
        self.seen = 0

        def fn(x):
            self.seen += x.shape[0]
            return base(x)

        super().__init__(fn, base.fingerprint, base.name, base.feature_names)
