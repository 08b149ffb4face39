"""From an H&E slide to predicted gene expression (issue 12).

Qt-free core, in the order the data flow through it:

* :mod:`.slide` — slides read whole (JPEG/PNG) or lazily (pyramidal TIFF, SVS);
* :mod:`.reading` — sections: slide + spot centres + counts + physical scale;
* :mod:`.tiles` — patches at a physical size, tissue mask, tile grid, Shannon selection;
* :mod:`.features` — hand-crafted, Fourier and torchvision-backbone patch features;
* :mod:`.models` — targets (log1p-normalised HVGs), PCA + ridge, checkpoints, predictions AnnData;
* :mod:`.finetune` — the fine-tuned network head (ST-Net style, ``HistologyConfig(model="finetune")``);
* :mod:`.fitting` — fit, save and load either kind of model;
* :mod:`.evaluation` — leave-one-section-out Pearson r with baselines.

The napari widget is :mod:`napari_omicsimage._widgets.histology`; the CLI is
``omicsimage histology evaluate|fit|predict``.
"""

from .evaluation import HistologyEvaluation, leave_one_section_out
from .features import FeatureExtractor
from .finetune import FineTunedModel
from .fitting import fit, load_model, save_model
from .models import EXPRESSION_SCALE, HistologyConfig, HistologyModel
from .reading import Scale, Section, read_section
from .slide import Slide, open_slide

__all__ = ["EXPRESSION_SCALE", "FeatureExtractor", "FineTunedModel", "HistologyConfig", "HistologyEvaluation",
           "HistologyModel", "Scale", "Section", "Slide", "fit", "leave_one_section_out", "load_model", "open_slide",
           "read_section", "save_model"]
