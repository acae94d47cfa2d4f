"""Sample data: rendered pallet load manifests with the guide's JSON schema.

Values, layouts, fonts sizes, margins, table styles, rotation and noise vary per
document, so a model has to read the page rather than memorise a template.
Writes the guide's layout: ``DIR/{train,valid,test}/annotations.jsonl`` plus images.

With ``multipage`` a share of the documents run over two pages: the product table starts on page 1 and
continues on page 2, and the totals are only on the last page, so the answer needs both pages. With
``pdf`` a share of the documents (one- or two-page) are written as PDFs instead of images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

PROMPT = "extract data in JSON format"

_PRODUCTS = [
    "6PK OF SHAMPOO", "24PK OF TOILET CLEANER", "ROLL OF MASKING TAPE", "24PK OF DISPOSABLE FACE MASKS",
    "CASE OF BUCKET LIDS", "CASE OF CLEANING BRUSHES", "BOX OF WINDOW CLEANERS", "BOX OF WORK GLOVES",
    "CASE OF AIR FRESHENER SPRAYS", "12PK OF PAPER TOWELS", "BOX OF TRASH BAGS", "CASE OF HAND SOAP",
    "PALLET OF BOTTLED WATER", "8PK OF AA BATTERIES", "BOX OF ZIP TIES", "CASE OF DISH DETERGENT",
    "DRUM OF FLOOR WAX", "BOX OF LATEX GLOVES", "CASE OF GLASS CLEANER", "4PK OF MOP HEADS",
]
_FIRST = ["KATIE", "BRIDGET", "JAMES", "MARIA", "DAVID", "LINDA", "ROBERT", "CHEN", "AISHA", "OMAR", "SOFIA", "PETER"]
_LAST = ["FRANCO", "WEBER", "NGUYEN", "SMITH", "GARCIA", "MÜLLER", "OKAFOR", "JOHNSON", "ROSSI", "KOWALSKI", "SATO"]
_STREETS = ["Campbell Fork", "Russell Burgs", "Maple Avenue", "Harbor Road", "Industrial Pkwy", "Elm Street", "Ridge Lane"]
_CITIES = [("West Georgeview", "OK"), ("Ricetown", "SD"), ("Port Lisa", "TX"), ("Lake Anna", "WA"), ("Northfield", "MN"),
           ("Springdale", "AR"), ("Oakridge", "TN"), ("Fairview", "OR")]


def make_manifest(rng: random.Random, products_range: tuple[int, int] = (1, 5)) -> dict[str, Any]:
    """One random manifest, key order as in the guide."""
    products = []
    for _ in range(rng.randint(*products_range)):
        products.append({
            "description": f"{rng.randint(100000, 999999)} - {rng.choice(_PRODUCTS)}",
            "cases": str(rng.choice([1, 2, 4, 8, 16, 32, 64])),
            "sales_units": str(rng.choice([1, 2, 4, 8, 16, 32, 64])),
            "layers": str(rng.randint(1, 5)),
        })
    city, state = rng.choice(_CITIES)
    apt = f" Apt. {rng.randint(100, 999)}" if rng.random() < 0.4 else ""
    return {
        "route": f"{rng.choice('ABCDEFGHJKLMNOPRSTUWXYZ')}{rng.randint(100, 999)}-"
                 f"{rng.choice('ABCDEFGHJKLMNPRSTUWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUWXYZ')}-{rng.randint(100, 999)}",
        "pallet_number": str(rng.randint(1, 99)),
        "delivery_date": f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.choice([2023, 2024, 2025])}",
        "load": str(rng.randint(1, 9)),
        "dock": f"D{rng.randint(1, 40)}",
        "shipment_id": f"{rng.choice('EWKTR')}{rng.randint(10**10, 10**11 - 1)}",
        "destination": f"{rng.randint(100, 99999)} {rng.choice(_STREETS)}{apt}, {city}, {state} {rng.randint(10000, 99999)}",
        "asn_number": str(rng.randint(10**9, 10**10 - 1)),
        "salesman": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
        "products": products,
        "total_cases": str(sum(int(p["cases"]) for p in products)),
        "total_units": str(sum(int(p["sales_units"]) for p in products)),
        "total_layers": str(sum(int(p["layers"]) for p in products)),
        "printed_date": f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/2024 {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "page_number": str(rng.randint(1, 99)),
    }


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_manifest(doc: dict[str, Any], rng: random.Random, width: int = 850, height: int = 1100) -> Image.Image:
    """Draw a manifest page; layout details are drawn from rng.

    The page is laid out at 850x1100 (letter at 100 dpi) and then scaled to ``width`` x ``height``,
    so small sample images keep the layout's proportions instead of overlapping text.
    """
    out_size = (width, height)
    width, height = 850, 1100
    bg = rng.choice([(255, 255, 255), (250, 248, 240), (244, 246, 250)])
    im = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(im)
    ink = rng.choice([(0, 0, 0), (20, 20, 60), (40, 40, 40)])
    margin = rng.randint(30, 70)
    base = rng.randint(15, 19)
    big, small = _font(base + 8), _font(base)
    y = margin
    d.text((margin, y), rng.choice(["PALLET LOAD MANIFEST", "DELIVERY MANIFEST", "Pallet Manifest"]), font=big, fill=ink)
    y += base + 24
    header = [("Route", doc["route"]), ("Pallet", doc["pallet_number"]), ("Delivery Date", doc["delivery_date"]),
              ("Load", doc["load"]), ("Dock", doc["dock"]), ("Shipment ID", doc["shipment_id"]),
              ("ASN", doc["asn_number"]), ("Salesman", doc["salesman"])]
    if rng.random() < 0.5:
        rng.shuffle(header)
    two_col = rng.random() < 0.6
    col_w = (width - 2 * margin) // 2
    for i, (k, v) in enumerate(header):
        x = margin + (col_w if two_col and i % 2 else 0)
        d.text((x, y), f"{k}: {v}", font=small, fill=ink)
        if not two_col or i % 2:
            y += base + 10
    y += base + 6
    d.text((margin, y), f"Destination: {doc['destination']}", font=small, fill=ink)
    y += base + 22
    cols = [margin, margin + int((width - 2 * margin) * 0.55), margin + int((width - 2 * margin) * 0.7),
            margin + int((width - 2 * margin) * 0.85)]
    grid = rng.random() < 0.5
    row_h = base + 14
    d.line((margin, y - 4, width - margin, y - 4), fill=ink, width=2)
    for x, name in zip(cols, ["Description", "Cases", "Units", "Layers"]):
        d.text((x + 4, y), name, font=small, fill=ink)
    y += row_h
    d.line((margin, y - 4, width - margin, y - 4), fill=ink, width=1)
    for p in doc["products"]:
        for x, val in zip(cols, [p["description"], p["cases"], p["sales_units"], p["layers"]]):
            d.text((x + 4, y), val, font=small, fill=ink)
        y += row_h
        if grid:
            d.line((margin, y - 4, width - margin, y - 4), fill=(150, 150, 150), width=1)
    d.line((margin, y - 4, width - margin, y - 4), fill=ink, width=2)
    for x, val in zip(cols, ["TOTAL", doc["total_cases"], doc["total_units"], doc["total_layers"]]):
        d.text((x + 4, y), val, font=small, fill=ink)
    y = height - margin - base
    d.text((margin, y), f"Printed {doc['printed_date']}", font=small, fill=ink)
    d.text((width - margin - 90, y), f"Page {doc['page_number']}", font=small, fill=ink)
    angle = rng.uniform(-1.5, 1.5)
    im = im.rotate(angle, resample=Image.BICUBIC, fillcolor=bg)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return im if out_size == im.size else im.resize(out_size, Image.LANCZOS)


def render_two_pages(doc: dict[str, Any], rng: random.Random, width: int = 850, height: int = 1100
                     ) -> list[Image.Image]:
    """A manifest over two pages: header and the first products on page 1 ("continued"), the remaining
    products, the totals and the print line on page 2."""
    bg = rng.choice([(255, 255, 255), (250, 248, 240), (244, 246, 250)])
    ink = rng.choice([(0, 0, 0), (20, 20, 60), (40, 40, 40)])
    margin, base = rng.randint(30, 70), rng.randint(15, 19)
    big, small = _font(base + 8), _font(base)
    W, H = 850, 1100
    cols = [margin, margin + int((W - 2 * margin) * 0.55), margin + int((W - 2 * margin) * 0.7),
            margin + int((W - 2 * margin) * 0.85)]
    row_h = base + 14
    products = doc["products"]
    split = max(1, len(products) // 2)
    pages = []
    for k, chunk in enumerate((products[:split], products[split:])):
        im = Image.new("RGB", (W, H), bg)
        d = ImageDraw.Draw(im)
        y = margin
        if k == 0:
            d.text((margin, y), "PALLET LOAD MANIFEST", font=big, fill=ink)
            y += base + 24
            for key, v in (("Route", doc["route"]), ("Pallet", doc["pallet_number"]),
                           ("Delivery Date", doc["delivery_date"]), ("Load", doc["load"]), ("Dock", doc["dock"]),
                           ("Shipment ID", doc["shipment_id"]), ("ASN", doc["asn_number"]),
                           ("Salesman", doc["salesman"])):
                d.text((margin, y), f"{key}: {v}", font=small, fill=ink)
                y += base + 10
            d.text((margin, y), f"Destination: {doc['destination']}", font=small, fill=ink)
            y += base + 22
        else:
            d.text((margin, y), f"PALLET LOAD MANIFEST (continued) - Route {doc['route']}", font=small, fill=ink)
            y += base + 30
        d.line((margin, y - 4, W - margin, y - 4), fill=ink, width=2)
        for x, name in zip(cols, ["Description", "Cases", "Units", "Layers"]):
            d.text((x + 4, y), name, font=small, fill=ink)
        y += row_h
        for prod in chunk:
            for x, val in zip(cols, [prod["description"], prod["cases"], prod["sales_units"], prod["layers"]]):
                d.text((x + 4, y), val, font=small, fill=ink)
            y += row_h
        d.line((margin, y - 4, W - margin, y - 4), fill=ink, width=2)
        if k == 0:
            d.text((margin, y + 6), "continued on page 2", font=small, fill=ink)
        else:
            for x, val in zip(cols, ["TOTAL", doc["total_cases"], doc["total_units"], doc["total_layers"]]):
                d.text((x + 4, y), val, font=small, fill=ink)
            d.text((margin, H - margin - base), f"Printed {doc['printed_date']}", font=small, fill=ink)
        d.text((W - margin - 140, H - margin - base), f"Page {k + 1} of 2", font=small, fill=ink)
        im = im.rotate(rng.uniform(-1.0, 1.0), resample=Image.BICUBIC, fillcolor=bg)
        pages.append(im if (width, height) == im.size else im.resize((width, height), Image.LANCZOS))
    return pages


def write_dataset(out: str | Path, n_train: int = 16, n_valid: int = 4, n_test: int = 0, seed: int = 0,
                  size: tuple[int, int] = (850, 1100), multipage: float = 0.0, pdf: float = 0.0) -> Path:
    """Write a sample dataset in the guide's layout and return its folder.

    ``multipage``: the share of documents over two pages (``"images": [p1, p2]`` rows, or a two-page PDF);
    ``pdf``: the share written as PDFs. With both 0 the output is the single-page image dataset of before.
    """
    from .documents import pdf_bytes_from_images

    out = Path(out)
    rng = random.Random(seed)
    layout = random.Random(seed + 10_007)  # which documents are two-page or PDF: apart from the content's draws
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n <= 0:
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "annotations.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                two, as_pdf = layout.random() < multipage, layout.random() < pdf
                doc = make_manifest(rng, (3, 7) if two else (1, 5))
                if two:
                    del doc["page_number"]  # the pages say "Page 1 of 2", "Page 2 of 2": no single number
                pages = render_two_pages(doc, rng, *size) if two else [render_manifest(doc, rng, *size)]
                if as_pdf:
                    name = f"manifest_{i:04d}.pdf"
                    (folder / name).write_bytes(pdf_bytes_from_images(pages))
                    row = {"image": name, "prefix": PROMPT, "suffix": doc}
                elif two:
                    names = [f"manifest_{i:04d}_p{k + 1}.jpg" for k in range(len(pages))]
                    for name, page in zip(names, pages):
                        page.save(folder / name, quality=90)
                    row = {"images": names, "prefix": PROMPT, "suffix": doc}
                else:
                    name = f"manifest_{i:04d}.jpg"
                    pages[0].save(folder / name, quality=90)
                    row = {"image": name, "prefix": PROMPT, "suffix": doc}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def corpus(n: int = 200, seed: int = 1) -> list[str]:
    """Text in the domain (serialised manifests), used to build the tiny test tokenizer."""
    rng = random.Random(seed)
    return [json.dumps(make_manifest(rng), ensure_ascii=False) for _ in range(n)] + [PROMPT, "You are a helpful assistant."]
