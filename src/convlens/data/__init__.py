"""Datasets for dataset-level evaluation: image folders, CSV lists, PASCAL VOC / ImageNet XML boxes, COCO
instance masks, and the exact-ground-truth synthetic benchmark (its two trained CNNs are in
:mod:`convlens.models.synthetic`)."""

from convlens.data.base import ImageDataset, Sample, boxes_to_mask, preprocess_mask
from convlens.data.coco import COCOInstances
from convlens.data.folders import CSVImageDataset, ImageFolder
from convlens.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from convlens.data.synthetic import SyntheticShapes
from convlens.data.voc import VOC_CLASSES, VOCDetection, XMLBoxDataset

__all__ = [
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "COCOInstances",
    "CSVImageDataset",
    "ImageDataset",
    "ImageFolder",
    "Sample",
    "SyntheticShapes",
    "VOCDetection",
    "XMLBoxDataset",
    "boxes_to_mask",
    "preprocess_mask",
]
