"""The geometry of a dataset's images: one record, read from the data, never a constant.

`Geometry(height, width, channels, classes, class_names)` is what everything that sizes, masks or draws
images reads: the networks' input and output sizes (`dims`), the quadrant masks, the drawings, TensorBoard's
tiles, cvae-sample's PNGs. The source finds it (`cvae_exp.data.sources`), the splits and the experiment carry
it, and every checkpoint records it (`record()`); a checkpoint without one was trained on MNIST
(`from_record(None)`). A network factory takes it as it is: it is frozen and hashable, so it can sit in a
jitted step's static arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    channels: int  # 1: grayscale, 3: RGB
    classes: int  # the number of class labels; 0: the data has none
    class_names: tuple[str, ...] = ()  # one per class ("0".."9" where the data names none)

    @property
    def pixels(self) -> int:
        """Spatial positions, height x width."""
        return self.height * self.width

    @property
    def dims(self) -> int:
        """Dimensions of one image, height x width x channels: the size of y, and the D of bits per dimension."""
        return self.height * self.width * self.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels): a flat image [dims] reshaped, channels last."""
        return self.height, self.width, self.channels

    def describe(self) -> str:
        """'32x32x3 (height x width x channels), 3 classes' (or 'no classes')."""
        classes = f"{self.classes} classes" if self.classes else "no classes"
        return f"{self.height}x{self.width}x{self.channels} (height x width x channels), {classes}"

    def same_shape(self, other: Geometry) -> bool:
        """Whether a network built for one fits the other: sizes and class count (names may differ)."""
        return (self.height, self.width, self.channels, self.classes) == (
            other.height,
            other.width,
            other.channels,
            other.classes,
        )

    def record(self) -> dict:
        """What a checkpoint's meta and the data record hold (plain JSON)."""
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "classes": self.classes,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_record(cls, record: dict | None) -> Geometry:
        """The geometry a checkpoint recorded; one saved before geometries were recorded holds MNIST."""
        if not record:
            return MNIST
        return cls(
            int(record["height"]),
            int(record["width"]),
            int(record["channels"]),
            int(record["classes"]),
            tuple(str(n) for n in record.get("class_names", ())),
        )


def numbered(classes: int) -> tuple[str, ...]:
    """The names of classes that the data does not name: "0", "1", ..."""
    return tuple(str(i) for i in range(classes))


MNIST = Geometry(28, 28, 1, 10, numbered(10))  # what a record-less (older) checkpoint was trained on
