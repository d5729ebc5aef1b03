"""DICOM PS3.15 Annex E, Table E.1-1 (basic application level confidentiality profile), as data.

Each row names an attribute by pydicom keyword, the profile's action and the groups of attributes
an option may keep:

* ``X`` remove; ``Z`` zero length, or a dummy value; ``D`` a dummy value; ``U`` a new UID. A
  compound action (``X/Z``, ``X/Z/D``, ``X/Z/U*``) is resolved by the attribute's type in the IOD:
  removed where it is optional, blanked or replaced by a dummy where the IOD requires it.
  InstitutionName, InstitutionCodeSequence, StationName and OperatorsName are optional (type 3)
  in every IOD a node trains on (CT, MR and PET images, SEG, RTSTRUCT), so they are recorded as
  ``X``.
* Option groups: ``dates`` (Retain Longitudinal Temporal Information, with Full or with Modified
  Dates), ``descriptors`` (Clean Descriptors), ``characteristics`` (Retain Patient
  Characteristics), ``device`` (Retain Device Identity), ``institution`` (Retain Institution
  Identity), ``uids`` (Retain UIDs).

Source: the 2025 edition of the table in machine-readable form, keywords from pydicom's data
dictionary. Of the rows for repeating groups, curve data and overlay data and comments are listed
by the keyword pydicom gives every group of them; private attributes are checked in
:mod:`nodes.deid`; ``U`` rows become :data:`UID_KEYWORDS`. Review this table
against each new edition of PS3.15 before real patient data leaves a site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One attribute of the profile: its action and the option groups that may keep its value."""

    keyword: str
    action: str
    kept_by: frozenset[str]

    @property
    def allows_dummy(self) -> bool:
        """Whether the profile lets a de-identified object keep a value here (Z, D or new UIDs)."""
        return bool({"Z", "D", "U*"} & set(self.action.split("/")))


@dataclass(frozen=True)
class Option:
    """A PS3.15 profile option a provider may declare, with its CID 7050 code."""

    name: str
    code: str
    meaning: str
    keeps: str  # the option group of Table E.1-1 it keeps


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("clean_descriptors", "113105", "Clean Descriptors Option", "descriptors"),
    Option("retain_longitudinal_full_dates", "113106",
           "Retain Longitudinal Temporal Information Full Dates Option", "dates"),
    Option("retain_longitudinal_modified_dates", "113107",
           "Retain Longitudinal Temporal Information Modified Dates Option", "dates"),
    Option("retain_patient_characteristics", "113108", "Retain Patient Characteristics Option", "characteristics"),
    Option("retain_device_identity", "113109", "Retain Device Identity Option", "device"),
    Option("retain_uids", "113110", "Retain UIDs Option", "uids"),
    Option("retain_institution_identity", "113112", "Retain Institution Identity Option", "institution"),
)}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

def _words(text: str) -> list[str]:
    return text.split()


# (action, option groups that keep the attribute): keywords
_TABLE: dict[tuple[str, tuple[str, ...]], str] = {
    ("D", ()): """
    CertificateOfSigner ClinicalTrialProtocolID ClinicalTrialSponsorName ClinicalTrialSubjectID
    ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence EncapsulatedDocument
    FlowIdentifier FlowIdentifierSequence GraphicAnnotationSequence PersonIdentificationCodeSequence
    PersonName SelectorOBValue SelectorPNValue SelectorUNValue SelectorURValue SourceIdentifier
    SpecimenIdentifier VerifyingObserverName VerifyingObserverSequence VerifyingOrganization""",
    ("X", ()): """
    CurveData OverlayComments OverlayData
    ActualHumanPerformersSequence AddressTrial AdmissionID Arbitrary AuthorObserverSequence
    BranchOfService CameraOwnerName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
    ClinicalTrialSeriesID ConfidentialityConstraintOnPatientDataDescription
    ConsultingPhysicianIdentificationSequence ContainerComponentID
    ContentCreatorIdentificationCodeSequence CountryOfResidence CurrentObserverTrial
    CurrentPatientLocation CustodialOrganizationSequence DataSetTrailingPadding
    DigitalSignaturesSequence DistributionAddress DistributionName GPSAltitude GPSAltitudeRef
    GPSAreaInformation GPSDOP GPSDestBearing GPSDestBearingRef GPSDestDistance GPSDestDistanceRef
    GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude GPSDestLongitudeRef GPSDifferential
    GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude GPSLongitudeRef
    GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed GPSSpeedRef GPSStatus
    GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID HumanPerformerName HumanPerformerOrganization
    IconImageSequence ImagePresentationComments InstanceOriginStatus InsurancePlanIdentification
    IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
    InterpretationAuthor InterpretationID InterpretationIDIssuer InterpretationRecorder
    InterpretationTranscriber IssuerOfAdmissionID IssuerOfAdmissionIDSequence
    IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID
    IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID
    IssuerOfClinicalTrialTimePointID IssuerOfPatientID IssuerOfServiceEpisodeID
    IssuerOfServiceEpisodeIDSequence MAC MedicalRecordLocator MilitaryRank ModifiedAttributesSequence
    ModifiedImageDescription NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults
    NonconformingDataElementValue NonconformingModifiedAttributesSequence OperatorsName
    OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
    OriginalAttributesSequence OtherClinicalTrialProtocolIDsSequence OtherPatientIDs
    OtherPatientIDsSequence OtherPatientNames ParticipantSequence PatientAddress PatientBirthName
    PatientBirthTime PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
    PatientReligiousPreference PatientTelecomInformation PatientTelephoneNumbers
    PatientTransportArrangements PerformedLocation PerformedProcedureStepID
    PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
    PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
    PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence
    ROICreatorSequence ROIInterpreterSequence ReferencedDigitalSignatureSequence
    ReferencedPatientAliasSequence ReferencedPatientPhotoSequence ReferencedSOPInstanceMACSequence
    ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
    ReferringPhysicianTelephoneNumbers RegionOfResidence RequestedProcedureID RequestedProcedureLocation
    RequestingPhysician RequestingService ResponsibleOrganization ResponsiblePerson
    ResultsDistributionListSequence ResultsID ResultsIDIssuer ScheduledHumanPerformersSequence
    ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
    ScheduledPerformingPhysicianName ScheduledProcedureStepID ServiceEpisodeID SlideIdentifier
    SpecimenAccessionNumber StudyIDIssuer TelephoneNumberTrial TextComments TextString TopicAuthor
    TopicKeywords TopicSubject TopicTitle VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial""",
    ("X/D", ()): """
    OperatorIdentificationSequence""",
    ("X/Z", ()): """
    AcquisitionContextSequence BarcodeValue ReviewerName""",
    ("Z", ()): """
    AccessionNumber ClinicalTrialProtocolName ClinicalTrialTimePointID ConsultingPhysicianName
    DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest
    IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence PatientBirthDate
    PatientName PlacerOrderNumberImagingServiceRequest ROIInterpreter RTAccessoryDeviceSlotID
    RTAccessoryHolderSlotID ReferringPhysicianName SpecimenPreparationSequence StudyID
    VerifyingObserverIdentificationCodeSequence""",
    ("Z/D", ()): """
    ContentCreatorName PatientID""",
    ("D", ("characteristics",)): """
    SelectorASValue""",
    ("X", ("characteristics",)): """
    EthnicGroup PatientAge PatientSize PatientWeight PreMedication PregnancyStatus SmokingStatus
    SpecialNeeds""",
    ("X/Z", ("characteristics",)): """
    PatientSexNeutered""",
    ("Z", ("characteristics",)): """
    PatientSex""",
    ("X", ("characteristics", "descriptors")): """
    Allergies PatientState""",
    ("D", ("dates",)): """
    AssertionDateTime AttributeModificationDateTime ContextGroupLocalVersion ContextGroupVersion Date
    DateTime DecayCorrectionDateTime DigitalSignatureDateTime EffectiveDateTime ExclusionStartDateTime
    FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse
    HangingProtocolCreationDateTime ImpedanceMeasurementDateTime InformationIssueDateTime
    InterlockDateTime OverrideDateTime RecordedRTControlPointDateTime ReferencedDateTime
    SafePositionExitDate SafePositionExitTime SafePositionReturnDate SafePositionReturnTime
    SelectorDAValue SelectorDTValue SelectorTMValue SourceEndDateTime SourceStartDateTime
    SourceStrengthReferenceDate SourceStrengthReferenceTime Time TreatmentControlPointDate
    TreatmentControlPointTime TreatmentToleranceViolationDateTime VerificationDateTime""",
    ("X", ("dates",)): """
    AdmittingDate AdmittingTime ApprovalStatusDateTime AssertionExpirationDateTime CertifiedTimestamp
    ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime CreationDate CreationTime
    CurveDate CurveTime DateOfDocumentOrVerbalTransactionTrial DateOfSecondaryCapture DischargeDate
    DischargeTime EthicsCommitteeApprovalEffectivenessEndDate
    EthicsCommitteeApprovalEffectivenessStartDate ExpectedCompletionDateTime
    FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial GPSDateStamp
    HL7DocumentEffectiveTime InstanceCoercionDateTime IntendedFractionStartTime
    InterpretationApprovalDate InterpretationApprovalTime InterpretationRecordedDate
    InterpretationRecordedTime InterpretationTranscriptionDate InterpretationTranscriptionTime
    InterventionDrugStartTime InterventionDrugStopTime IssueDateOfImagingServiceRequest
    IssueTimeOfImagingServiceRequest LastMenstrualDate ModifiedImageDate ModifiedImageTime
    ObservationDateTrial ObservationStartDateTime ObservationTimeTrial OverlayDate OverlayTime
    PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime
    PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime
    PresentationCreationDate PresentationCreationTime ProcedureStepCancellationDateTime
    ProductExpirationDateTime ROIDateTime ROIObservationDateTime RadiopharmaceuticalStartDateTime
    RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime
    SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate
    ScheduledDischargeTime ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
    ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepModificationDateTime
    ScheduledProcedureStepStartDate ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime
    ScheduledStudyStartDate ScheduledStudyStartTime ScheduledStudyStopDate ScheduledStudyStopTime
    StudyArrivalDate StudyArrivalTime StudyCompletionDate StudyCompletionTime StudyReadDate
    StudyReadTime StudyVerifiedDate StudyVerifiedTime SubstanceAdministrationDateTime
    TemplateLocalVersion TemplateVersion TimeOfDocumentCreationOrVerbalTransactionTrial
    TimeOfSecondaryCapture TimezoneOffsetFromUTC""",
    ("X/D", ("dates",)): """
    EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate
    IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime RTPlanDate RTPlanTime SeriesDate
    SeriesTime StartAcquisitionDateTime TreatmentDate TreatmentTime""",
    ("X/Z", ("dates",)): """
    AcquisitionDate AcquisitionTime""",
    ("X/Z/D", ("dates",)): """
    AcquisitionDateTime InstanceCreationTime""",
    ("Z", ("dates",)): """
    ParticipationDateTime ReviewDate ReviewTime StructureSetDate StructureSetTime StudyDate StudyTime""",
    ("Z/D", ("dates",)): """
    ContentDate ContentTime InstructionPerformedDateTime""",
    ("D", ("dates", "device")): """
    BeamHoldTransitionDateTime""",
    ("X", ("dates", "device")): """
    CalibrationDate CalibrationTime DateOfInstallation DateOfLastCalibration DateOfManufacture
    DateTimeOfLastCalibration TimeOfLastCalibration""",
    ("X/D", ("dates", "device")): """
    DateOfLastDetectorCalibration TimeOfLastDetectorCalibration""",
    ("Z", ("dates", "device")): """
    CalibrationDateTime""",
    ("D", ("descriptors",)): """
    AcquisitionFieldOfViewLabel AnnotationGroupLabel EntityLabel EntityLongLabel InterlockDescription
    InterlockOriginDescription RTPlanLabel RTPrescriptionLabel RTToleranceSetLabel
    RadiationDoseIdentificationLabel RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel
    ReasonForTheAttributeModification SelectorLOValue SelectorLTValue SelectorSHValue SelectorSTValue
    SelectorUTValue StructureSetLabel TreatmentPositionGroupLabel TreatmentToleranceViolationDescription
    UserContentLabel UserContentLongLabel""",
    ("X", ("descriptors",)): """
    AcquisitionComments AcquisitionProtocolDescription AdditionalPatientHistory
    AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AnnotationGroupDescription
    BeamDescription BolusDescription ClinicalTrialSeriesDescription ClinicalTrialTimePointDescription
    CommentsOnRadiationDose CommentsOnThePerformedProcedureStep CompensatorDescription
    ContainerDescription ContributionDescription DecompositionDescription DerivationDescription
    DeviceSettingDescription DischargeDiagnosisDescription DisplacementReferenceLabel
    DoseReferenceDescription EntityDescription EntityName EquipmentFrameOfReferenceDescription
    FilterLookupTableDescription FixationDeviceDescription FractionGroupDescription FrameComments
    IdentifyingComments ImageComments ImagingServiceRequestComments Impressions
    InterpretationDiagnosisDescription InterpretationText LongDeviceDescription MakerNote MedicalAlerts
    MultienergyAcquisitionDescription Occupation PatientComments PatientSetupPhotoDescription
    PatientTreatmentPreparationMethodDescription
    PatientTreatmentPreparationProcedureParameterDescription PerformedProcedureStepDescription
    PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PrescriptionDescription
    PriorTreatmentDoseDescription PyramidDescription PyramidLabel ROIDescription
    ROIGenerationDescription ROIObservationDescription ROIObservationLabel RTPlanDescription RTPlanName
    ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy
    ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure ReasonForVisit
    ReasonForVisitCodeSequence RequestAttributesSequence RequestedContrastAgent
    RequestedProcedureComments RequestedSeriesDescription
    RespiratoryMotionCompensationTechniqueDescription ResultsComments ScheduledProcedureStepDescription
    SeriesDescription ServiceEpisodeDescription SetupTechniqueDescription ShieldingDeviceDescription
    SpecimenDetailedDescription SpecimenShortDescription StructureSetDescription StructureSetName
    StudyComments StudyDescription TreatmentSites VisitComments WaveformFilterDescription""",
    ("X/D", ("descriptors",)): """
    AcquisitionDeviceProcessingDescription ProtocolName RTTreatmentApproachLabel TreatmentSite""",
    ("X/Z", ("descriptors",)): """
    LabelText RequestedProcedureDescription""",
    ("Z", ("descriptors",)): """
    ConceptualVolumeCombinationDescription ConceptualVolumeDescription FractionationNotes
    PrescriptionNotes PrescriptionNotesSequence ROIName RTPhysicianIntentNarrative
    RadiationGenerationModeDescription ReasonForSuperseding TreatmentTechniqueNotes""",
    ("Z/D", ("descriptors",)): """
    ContrastBolusAgent""",
    ("D", ("device",)): """
    DestinationAE DeviceLabel ModifyingSystem SelectorAEValue XRayDetectorID XRaySourceID""",
    ("X", ("device",)): """
    CassetteID DeviceDescription GantryID GeneratorID LensMake LensModel LensSerialNumber
    LensSpecification ModifyingDeviceID NetworkID Originator PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
    PlateID ReceivingAE RequestingAE RetrieveAETitle ScheduledProcedureStepLocation
    ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    SourceManufacturer StationAETitle StationName TransducerIdentificationSequence UDISequence
    UniqueDeviceIdentifier XRayDetectorLabel""",
    ("X/D", ("device",)): """
    DetectorID""",
    ("X/Z", ("device",)): """
    SourceSerialNumber TreatmentMachineName""",
    ("X/Z/D", ("device",)): """
    DeviceSerialNumber""",
    ("Z", ("device",)): """
    ManufacturerDeviceIdentifier""",
    ("D", ("institution",)): """
    ClinicalTrialProtocolEthicsCommitteeName""",
    ("X", ("institution",)): """
    InstitutionAddress InstitutionCodeSequence InstitutionName InstitutionalDepartmentName
    InstitutionalDepartmentTypeCodeSequence""",
    ("Z", ("institution",)): """
    ClinicalTrialCoordinatingCenterName ClinicalTrialSiteID ClinicalTrialSiteName SourceOfPreviousValues""",
    ("D", ("uids",)): """
    AnnotationGroupUID""",
    ("X", ("uids",)): """
    AffectedSOPInstanceUID ReferencedPatientSequence""",
    ("X/Z", ("uids",)): """
    ReferencedStudySequence""",
    ("X/Z/D", ("uids",)): """
    ReferencedPerformedProcedureStepSequence""",
    ("X/Z/U*", ("uids",)): """
    ReferencedImageSequence SourceImageSequence""",
}

# Attributes the profile gives a new UID (action U); a de-identified object holds them only in a
# re-generated form (UID_FORMS) unless the provider declares retain_uids.
UID_KEYWORDS: frozenset[str] = frozenset(_words("""
    AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
    DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
    FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
    LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MediaStorageSOPInstanceUID
    MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID
    PatientSetupUID PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID
    RTTreatmentPhaseUID ReferencedConceptualVolumeUID ReferencedDoseReferenceUID
    ReferencedDosimetricObjectiveUID ReferencedFiducialsUID ReferencedFrameOfReferenceUID
    ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
    RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
    SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID
    StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
    TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID
    TreatmentSessionUID UID
"""))

# File meta information (group 0002) naming a device, a site or a private process. PS3.15 leaves
# the file meta to whoever writes the file; the check and the export treat these as X, the first
# six kept under retain_device_identity.
FILE_META: dict[str, Rule] = {k: Rule(k, "X", frozenset({"device"} if "PrivateInformation" not in k else ()))
                              for k in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                                        "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
                                        "SendingPresentationAddress", "ReceivingPresentationAddress",
                                        "PrivateInformationCreatorUID", "PrivateInformation")}

# UIDs that are not the scanner's: UUID-derived (PS3.5 B.2) and the form dicognito writes,
# "2." followed by 10**39 + a 128-bit digest (40 digits, the first a 1).
UID_FORMS = (re.compile(r"2\.25\.[1-9][0-9]{0,38}"), re.compile(r"2\.1[0-9]{39}"))
UID_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# Objects whose pixels are screens, photographs or captures: burned-in text is the rule there, so
# only BurnedInAnnotation "NO" (an operator's review) clears them, never the pixel heuristic.
CAPTURE_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame SC (bit, byte)
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame SC (word, true colour)
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2",  # US, Enhanced US volume
    "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",  # US, US multi-frame (retired)
    "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.104.2",  # encapsulated PDF, CDA
})
CAPTURE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.77.",)  # visible light: endoscopy, photographs, ...
CAPTURE_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "DOC", "IVUS"})
# Objects with no picture of the patient to carry text: segmentations, RT structures, doses, plans.
NO_PICTURE_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
})


def _rules() -> dict[str, Rule]:
    rules = {}
    for (action, kept_by), keywords in _TABLE.items():
        for keyword in _words(keywords):
            if keyword in rules:
                raise ValueError(f"{keyword} appears twice in the profile table")
            rules[keyword] = Rule(keyword, action, frozenset(kept_by))
    return rules


PROFILE: dict[str, Rule] = _rules()
# keyword -> action, the profile's first column alone
BASIC_PROFILE: dict[str, str] = {keyword: rule.action for keyword, rule in PROFILE.items()}
