/** OHIF 3.13.2 configuration for the viewer test: one DICOMweb data source, Orthanc behind
 * the test's same-origin proxy (tests/viewer/server.py). Nothing leaves the machine.
 * @type {AppTypes.Config} */
const origin = window.location.origin;

window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // the test runs unattended: no "investigational use" dialog to click away
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc DICOMweb (test)',
        name: 'orthanc',
        wadoUriRoot: origin + '/wado',
        qidoRoot: origin + '/dicom-web',
        wadoRoot: origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        // Orthanc's DICOMweb plugin wants the multipart type unquoted
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {
          enabled: true,
          relativeResolution: 'studies',
        },
      },
    },
  ],
};
