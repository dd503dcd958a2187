// Azure Monitor workbook over the gateway's App Insights data (infra/workbook.json).
param location string
param tags object = {}
param displayName string
param appInsightsId string

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // Workbook resource names must be GUIDs; stable per App Insights resource so redeploys update in place.
  name: guid(appInsightsId, 'ai-gateway-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: appInsightsId
    serializedData: loadTextContent('../workbook.json')
  }
}

output id string = workbook.id
