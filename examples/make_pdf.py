"""Regenerate examples/docs/hx-series-specifications.pdf.

Requires the third-party package fpdf2 (``pip install fpdf2``). fpdf2 is NOT a
runtime dependency of Atelier; it is only needed to rebuild this sample PDF,
for example in a throw-away virtual environment:

    python3 -m venv /tmp/pdfvenv
    /tmp/pdfvenv/bin/pip install fpdf2 pypdf
    /tmp/pdfvenv/bin/python examples/make_pdf.py

Only the PDF core fonts (Helvetica) are used, so every string must be
latin-1. Characters such as the degree sign and superscript digits are fine;
write "N m" instead of a middle dot, "-" instead of en dashes and "MOhm"
instead of the Greek omega. The creation date is pinned so that rebuilding
does not change the document metadata.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from fpdf import FPDF

OUT = Path(__file__).resolve().parent / "docs" / "hx-series-specifications.pdf"

DOC_ID = "VP-HX-SPEC-01, revision D"


class SpecPDF(FPDF):
    def header(self) -> None:
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 5, "Vantor Pumpworks - HX-Series Technical Specifications - " + DOC_ID,
                  new_x="LMARGIN", new_y="NEXT", align="L")
        self.ln(2)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 5, f"Page {self.page_no()}", align="C")


def h1(pdf: SpecPDF, text: str) -> None:
    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(0, 8, text, new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(2)


def h2(pdf: SpecPDF, text: str) -> None:
    if pdf.get_y() > pdf.h - 45:
        pdf.add_page()
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 12)
    pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(1)


def para(pdf: SpecPDF, text: str) -> None:
    pdf.set_font("Helvetica", "", 10)
    pdf.multi_cell(0, 5, " ".join(text.split()), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(2)


def bullets(pdf: SpecPDF, items: list[str]) -> None:
    pdf.set_font("Helvetica", "", 10)
    for item in items:
        pdf.multi_cell(0, 5, "- " + " ".join(item.split()), new_x="LMARGIN", new_y="NEXT",
                       align="L")
    pdf.ln(2)


def table(pdf: SpecPDF, rows: list[list[str]], widths: tuple[int, ...] | None = None) -> None:
    pdf.set_font("Helvetica", "", 9)
    with pdf.table(col_widths=widths, text_align="LEFT", line_height=5,
                   first_row_as_headings=True) as t:
        for row in rows:
            r = t.row()
            for cell in row:
                r.cell(cell)
    pdf.ln(3)


def build() -> None:
    pdf = SpecPDF(format="A4")
    pdf.set_creation_date(_dt.datetime(2025, 1, 15, tzinfo=_dt.UTC))
    pdf.set_title("Vantor HX-Series End-Suction Pumps: Technical Specifications")
    pdf.set_author("Vantor Pumpworks (fictional)")
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.set_margins(18, 15, 18)
    pdf.add_page()

    h1(pdf, "Vantor HX-Series End-Suction Pumps: Technical Specifications")
    para(pdf, f"""Document {DOC_ID}. This data book gives the technical data of the
        HX-40, HX-65 and HX-100 end-suction centrifugal pumps, their standard VM-series
        motors, bearing frames, mechanical seals and couplings. The values in this document
        are the reference for all other manuals of the HX manual set. Where a service
        bulletin changes a value, this document is revised accordingly.""")

    h2(pdf, "1. Type designation")
    para(pdf, """The type designation on the pump nameplate is built from the pump model,
        the installed impeller diameter in millimetres, the motor power in kilowatts and the
        seal code. Example: HX-65-235/15-MS2 is an HX-65 pump with an impeller trimmed to
        235 mm, a 15 kW motor and the standard MS-2 cartridge seal. The seal codes are MS2
        (standard, EPDM), MS2V (FKM), MS2A (silicon carbide against silicon carbide) and
        MS2D (double seal for Plan 53A).""")

    h2(pdf, "2. General operating limits")
    table(pdf, [
        ["Quantity", "Value"],
        ["Casing pressure rating", "PN16, maximum working pressure 16 bar at up to 120 °C"],
        ["Hydrostatic test pressure", "24 bar for 10 minutes"],
        ["Liquid temperature", "-20 °C to +120 °C"],
        ["Ambient temperature", "-20 °C to +40 °C (pump and motor); 0 °C to +40 °C (VCD-300)"],
        ["Nominal speed", "2900 rpm at 50 Hz; 3500 rpm at 60 Hz on request"],
        ["Direction of rotation", "Clockwise viewed from the motor (drive end)"],
        ["Solids content", "Maximum 0.5 % by volume, particle size below 1 mm"],
        ["Viscosity", "Up to 20 mm²/s without correction"],
        ["Flange standard", "EN 1092-2, PN16"],
    ], widths=(60, 114))

    h2(pdf, "3. Hydraulic data at the best efficiency point")
    para(pdf, """The following values apply at 2900 rpm with the maximum impeller diameter,
        for clean water at 20 °C. NPSHr is the net positive suction head at which the head
        drops by 3 %. The minimum continuous flow and the maximum flow limit the allowable
        operating range; continuous operation is recommended between 70 % and 110 % of the
        best efficiency flow.""")
    table(pdf, [
        ["Quantity", "HX-40", "HX-65", "HX-100"],
        ["Suction / discharge nozzle", "DN65 / DN40", "DN80 / DN65", "DN125 / DN100"],
        ["Best efficiency flow", "25 m³/h", "60 m³/h", "150 m³/h"],
        ["Head at best efficiency flow", "32 m", "45 m", "50 m"],
        ["Pump efficiency at BEP", "68 %", "74 %", "80 %"],
        ["Shaft power at BEP", "3.21 kW", "9.94 kW", "25.55 kW"],
        ["NPSHr at BEP", "2.4 m", "3.1 m", "4.2 m"],
        ["Shut-off head", "38 m", "54 m", "60 m"],
        ["Minimum continuous flow", "6 m³/h", "15 m³/h", "45 m³/h"],
        ["Maximum flow (120 % of BEP)", "30 m³/h", "72 m³/h", "180 m³/h"],
        ["Impeller diameter, max / min", "200 / 165 mm", "250 / 200 mm", "265 / 215 mm"],
        ["Number of impeller vanes", "5", "6", "7"],
        ["Vane pass frequency at 2900 rpm", "241.7 Hz", "290.0 Hz", "338.3 Hz"],
    ], widths=(66, 36, 36, 36))

    h2(pdf, "4. Performance curves in tabular form")
    para(pdf, """The tables list flow Q, head H, pump efficiency, shaft power P and NPSHr at
        2900 rpm with the maximum impeller diameter. Values between the listed points may be
        interpolated linearly. For other speeds, apply the affinity laws: flow changes in
        proportion to speed, head with the square of speed and power with the cube of
        speed.""")
    para(pdf, "HX-40, impeller diameter 200 mm:")
    table(pdf, [
        ["Q (m³/h)", "H (m)", "Efficiency", "P (kW)", "NPSHr (m)"],
        ["0", "38.0", "-", "1.40", "-"],
        ["6", "37.5", "32 %", "1.92", "-"],
        ["12.5", "36.5", "52 %", "2.39", "1.6"],
        ["19", "34.5", "63 %", "2.84", "1.9"],
        ["25", "32.0", "68 %", "3.21", "2.4"],
        ["30", "29.0", "66 %", "3.59", "3.3"],
    ])
    para(pdf, "HX-65, impeller diameter 250 mm:")
    table(pdf, [
        ["Q (m³/h)", "H (m)", "Efficiency", "P (kW)", "NPSHr (m)"],
        ["0", "54.0", "-", "3.60", "-"],
        ["15", "53.0", "42 %", "5.16", "-"],
        ["30", "51.0", "62 %", "6.72", "2.0"],
        ["45", "48.5", "71 %", "8.38", "2.5"],
        ["60", "45.0", "74 %", "9.94", "3.1"],
        ["72", "41.0", "72 %", "11.17", "4.0"],
    ])
    para(pdf, "HX-100, impeller diameter 265 mm:")
    table(pdf, [
        ["Q (m³/h)", "H (m)", "Efficiency", "P (kW)", "NPSHr (m)"],
        ["0", "60.0", "-", "9.50", "-"],
        ["45", "58.5", "50 %", "14.35", "-"],
        ["75", "57.0", "65 %", "17.92", "2.8"],
        ["112", "54.0", "75 %", "21.98", "3.3"],
        ["150", "50.0", "80 %", "25.55", "4.2"],
        ["180", "45.0", "78 %", "28.30", "5.6"],
    ])

    h2(pdf, "5. Materials of construction")
    table(pdf, [
        ["Part", "Standard material", "Option"],
        ["Volute casing, casing cover", "Grey cast iron EN-GJL-250", "Stainless steel 1.4408"],
        ["Impeller", "Tin bronze CuSn10", "Stainless steel 1.4408"],
        ["Casing wear ring", "HX-40: CuSn10 (since 2024/05); HX-65, HX-100: EN-GJL-250",
         "Stainless steel 1.4408"],
        ["Shaft", "Stainless steel 1.4021", "Duplex steel 1.4462"],
        ["Bearing frame", "Grey cast iron EN-GJL-250", "-"],
        ["Casing gasket", "Aramid fibre, 1 mm", "PTFE"],
    ], widths=(48, 70, 56))

    h2(pdf, "6. Bearing frames and lubrication")
    para(pdf, """The pump bearings are lubricated by an oil bath held at constant level by a
        constant-level oiler. Oil: mineral turbine oil with rust and oxidation inhibitors, ISO
        VG 68 (ISO VG 46 when the ambient temperature is continuously below 5 °C). First
        oil change after 200 operating hours, then every 4,000 h or 12 months, or every
        2,000 h when the bearing housing temperature exceeds 80 °C.""")
    table(pdf, [
        ["Quantity", "BF-1 (HX-40)", "BF-2 (HX-65)", "BF-3 (HX-100)"],
        ["Inboard bearing", "6306 C3", "6308 C3", "NU 311 ECP"],
        ["Outboard bearing", "3306 A/C3", "3308 A/C3", "2 x 7311 BECBM"],
        ["Oil capacity", "0.35 L", "0.55 L", "1.2 L"],
        ["Oil level below shaft centre", "28 mm", "33 mm", "41 mm"],
        ["Shaft diameter at seal", "35 mm", "45 mm", "55 mm"],
        ["Maximum shaft end play", "0.05 mm", "0.05 mm", "0.05 mm"],
    ], widths=(60, 38, 38, 38))
    para(pdf, """Bearing housing temperature: normal up to 75 °C and not more than 40 K
        above ambient; warning at 85 °C; trip at 95 °C. Vibration velocity on the
        bearing housings, 10 Hz to 1000 Hz: acceptance at commissioning 2.8 mm/s RMS,
        alarm 4.5 mm/s RMS, trip 7.1 mm/s RMS.""")

    h2(pdf, "7. Standard motors")
    table(pdf, [
        ["Quantity", "VM-132S2", "VM-160M2", "VM-200L2"],
        ["Used on", "HX-40", "HX-65", "HX-100"],
        ["Rated output", "5.5 kW", "15 kW", "37 kW"],
        ["Rated speed", "2920 rpm", "2945 rpm", "2960 rpm"],
        ["Rated current at 400 V", "10.4 A", "27.6 A", "64.5 A"],
        ["Efficiency (IE3)", "89.2 %", "92.1 %", "93.7 %"],
        ["Power factor", "0.87", "0.88", "0.89"],
        ["DE / NDE bearing", "6208-2Z C3 / 6208-2Z C3", "6309 C3 / 6209 C3", "6312 C3 / 6212 C3"],
        ["Regreasing", "Sealed, replace 20,000 h", "15 g / 10 g, 4,000 h", "25 g / 15 g, 3,000 h"],
        ["Maximum starts per hour", "12", "8", "6"],
        ["Motor weight", "38 kg", "105 kg", "240 kg"],
        ["Matching VCD-300 drive", "VCD-305", "VCD-315", "VCD-337"],
    ], widths=(50, 42, 41, 41))
    para(pdf, """All VM motors: 400 V delta / 690 V star, 50 Hz, IP55, cooling IC 411,
        insulation class F with class B temperature rise, three PTC thermistors responding at
        150 °C. Minimum insulation resistance before start: 10 MOhm at 40 °C, measured
        at 500 V DC. Grease for regreasable motors: polyurea, NLGI 2 (Vantor VL-2).""")

    h2(pdf, "8. Tightening torques")
    para(pdf, """Torques apply to lightly oiled steel fasteners of property class 8.8, or
        A4-70 for stainless fasteners. The impeller nut is secured with a new tab washer and
        medium-strength thread locker.""")
    table(pdf, [
        ["Fastener", "HX-40", "HX-65", "HX-100"],
        ["Impeller nut", "M16, 45 N m", "M20, 80 N m", "M24, 150 N m"],
        ["Casing bolts", "8 x M12, 60 N m", "8 x M16, 150 N m", "12 x M16, 150 N m"],
        ["Seal gland nuts", "M10, 20 N m", "M12, 35 N m", "M12, 35 N m"],
        ["Seal drive collar set screws", "8 N m", "8 N m", "8 N m"],
        ["Pump foot bolts", "M12, 70 N m", "M16, 170 N m", "M20, 330 N m"],
        ["Motor foot bolts", "M10, 45 N m", "M12, 80 N m", "M16, 195 N m"],
        ["Anchor bolts", "M16, 120 N m", "M16, 120 N m", "M20, 240 N m"],
        ["Bearing frame drain plug", "25 N m", "25 N m", "25 N m"],
    ], widths=(56, 38, 40, 40))

    h2(pdf, "9. Clearances, alignment and installation limits")
    table(pdf, [
        ["Quantity", "HX-40", "HX-65", "HX-100"],
        ["Wear ring clearance, new (diametral)", "0.30 - 0.40 mm", "0.35 - 0.45 mm",
         "0.45 - 0.55 mm"],
        ["Wear ring clearance, replace at", "0.80 mm", "0.90 mm", "1.10 mm"],
        ["Coupling type", "VC-28", "VC-38", "VC-55"],
        ["Distance between shaft ends (DBSE)", "100 mm", "100 mm", "140 mm"],
        ["Bare pump weight", "62 kg", "118 kg", "235 kg"],
    ], widths=(62, 37, 37, 38))
    bullets(pdf, [
        "Parallel offset: maximum 0.05 mm, vertical and horizontal.",
        "Angular misalignment: maximum 0.05 mm per 100 mm.",
        "Soft foot: maximum 0.05 mm at any foot; no more than four shims per foot.",
        "Baseplate level: 0.2 mm/m in both directions; grout thickness at least 25 mm.",
        "Pipe strain: coupling indicators must not move more than 0.05 mm when the flange "
        "bolts are loosened.",
        "Shaft run-out: 0.05 mm at the seal area, 0.03 mm at the coupling end.",
        "Hot alignment: motor set higher than the pump when cold by 0.05 mm at 90 °C, "
        "0.08 mm at 105 °C and 0.10 mm at 120 °C liquid temperature.",
        "NPSH margin: NPSHa at least NPSHr + 1.0 m or 1.3 x NPSHr, whichever is greater.",
    ])

    h2(pdf, "10. Allowable nozzle loads")
    para(pdf, """The piping must not apply forces and moments to the pump nozzles above the
        following values. The values are the maximum resultant force and resultant moment
        on each flange, with the pump mounted on a grouted baseplate. Where both force and
        moment approach their limits simultaneously, the sum of the ratios of actual to
        allowable values must not exceed 1.5.""")
    table(pdf, [
        ["Nozzle size", "Resultant force", "Resultant moment"],
        ["DN40", "900 N", "460 N m"],
        ["DN65", "1200 N", "600 N m"],
        ["DN80", "1400 N", "700 N m"],
        ["DN100", "1800 N", "800 N m"],
        ["DN125", "2200 N", "1000 N m"],
    ], widths=(58, 58, 58))

    h2(pdf, "11. Spare part numbers")
    table(pdf, [
        ["Part", "HX-40", "HX-65", "HX-100"],
        ["Casing wear ring", "40-502-B", "65-502", "100-502"],
        ["Impeller nut with tab washer", "40-320", "65-320", "100-320"],
        ["Cartridge seal, standard", "MS-2 35 EPDM", "MS-2 45 EPDM", "MS-2 55 EPDM"],
        ["Bearing kit with isolators", "BK-1", "BK-2", "BK-3"],
        ["Coupling element (high temperature)", "VC-28 (VC-28H)", "VC-38 (VC-38H)",
         "VC-55 (VC-55H)"],
        ["Gasket and O-ring set", "GS-40", "GS-65", "GS-100"],
    ], widths=(58, 38, 39, 39))
    para(pdf, """Always quote the pump serial number from the nameplate when ordering spare
        parts. The serial number format is model, year and sequence number, for example
        65-24-0312 for the 312th HX-65 built in 2024.""")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    build()
